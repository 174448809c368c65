"""`tierkv bench decode`: every requested system at every context, then floors and budget verdicts per row.

tierkv systems share one loaded model; transformers systems share one HF model, built in a child process (a
system the kernel kills for host memory becomes a row; see isolate.py); each family is freed before the next
loads, so the GPU holds one set of weights at a time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from tierkv.bench.common import format_context, run_record
from tierkv.bench.floor import Rates, floor_ms, kv_bytes_per_token, measure_rates, streamed_weight_bytes, weight_bytes
from tierkv.bench.isolate import isolated_rows, send_row
from tierkv.bench.systems import HF_SYSTEMS, SYSTEMS, TIERKV_SYSTEMS, DecodeSpec, Row, budget_tokens, free_memory, \
    given_shape, model_tier, run_tierkv, sparse_settings
from tierkv.config import format_size
from tierkv.errors import ConfigError, TierKVError
from tierkv.models.config import ModelConfig
from tierkv.models.shapes import SHAPES, shape_config

LINK_FREE = ("weights_hbm", "kv_hbm", "device->device")
HIDDEN_NOTE = ("estimate: 1 - (host-side I/O wait) / (link and disk bytes at measured bandwidth); "
               "waits the GPU does on its own streams are not seen")


def model_config(model: str) -> ModelConfig:
    """The shape of a built-in shape name, model folder or .gguf (without loading weights)."""
    if model in SHAPES:
        return shape_config(model)
    from transformers import AutoConfig

    from tierkv.models.weights import resolve_model

    return ModelConfig.from_hf(AutoConfig.from_pretrained(str(resolve_model(model))), name=model)


def run_decode(spec: DecodeSpec, *, io_json: str | None = None, hbm_gbps: float | None = None,
               log: Callable[[str], None] = lambda _: None,
               on_partial: Callable[[dict], None] | None = None) -> dict:
    """Measure every (system, context); returns the JSON document (rows in context, then system order).
    on_partial(doc) gets the document of the rows finished so far ("partial": true) after each row, so a run
    cut short (a time limit, an interrupt) still leaves its measured rows behind."""
    cfg = model_config(spec.model)
    total_steps = spec.warmup + spec.steps + (4 if spec.profile else 0) + 2
    log("measuring bandwidths for the floor")
    rates = measure_rates(spec.device, spec.dtype, spec.disk_dir, hbm_gbps=hbm_gbps, io_json=io_json)
    free_memory(spec.device)  # the probes' buffers must not count against the systems
    rows: dict[tuple[str, int], Row] = {}
    bar = tqdm(total=len(spec.systems) * len(spec.contexts), desc="bench decode", unit="run",
               disable=not sys.stderr.isatty(), leave=False)

    def record(row: Row) -> None:
        finish_row(row, rates, cfg, spec)
        rows[(row.system, row.context)] = row
        bar.update(1)
        bar.set_postfix_str(f"{row.system} {format_context(row.context)}: {row.status}")
        if on_partial is not None:
            on_partial({**_document(spec, cfg, rates, rows), "partial": True})

    too_long = [c for c in spec.contexts if spec.model not in SHAPES and c + total_steps > cfg.max_position_embeddings]
    for s in spec.systems:
        for c in too_long:
            record(Row(s, c, status="cannot_run", reason=f"context {c} + {total_steps} steps exceeds the model's "
                                                         f"window of {cfg.max_position_embeddings} tokens"))
    todo = [c for c in spec.contexts if c not in too_long]
    _tierkv_family(spec, cfg, todo, total_steps, record, log)
    _hf_family(spec, cfg, todo, total_steps, record)
    bar.close()
    return _document(spec, cfg, rates, rows)


def _document(spec: DecodeSpec, cfg: ModelConfig, rates: Rates, rows: dict[tuple[str, int], Row]) -> dict:
    order = {s: i for i, s in enumerate(spec.systems)}
    out = sorted(rows.values(), key=lambda r: (r.context, order[r.system]))
    return {"kind": "decode", "model": spec.model, "dtype": str(spec.dtype).replace("torch.", ""),
            "contexts": spec.contexts, "systems": list(spec.systems), "settings": _settings(spec, cfg),
            "weights_bytes": weight_bytes(cfg, spec.dtype), "kv_bytes_per_token": kv_bytes_per_token(cfg, spec.dtype),
            "rates": rates.to_json(), "rows": [asdict(r) for r in out]}


def _settings(spec: DecodeSpec, cfg: ModelConfig) -> dict:
    """The spec's settings, with the rank, score rank and chunk size the model runs with (given or its defaults);
    budget_tokens: the tokens a sparse step attends at each context (TierConfig.budget_tokens of the token budget
    and its floor)."""
    keys = ("gpu_budget", "kv_gpu_budget", "cpu_budget", "disk_dir", "reserve", "steps", "warmup", "token_budget",
            "budget_floor_tokens", "prefill_chunk", "profile", "seed")
    tier = model_tier(spec, cfg)
    return {**{k: getattr(spec, k) for k in keys}, "rank": tier.rank, "score_rank": tier.score_rank,
            "chunk_size": tier.chunk_size, "budget_tokens": {c: budget_tokens(spec, c) for c in spec.contexts}}


def _tierkv_family(spec, cfg, contexts, total_steps, record, log) -> None:
    systems = [s for s in spec.systems if s in TIERKV_SYSTEMS]
    if not systems or not contexts:
        return
    import tierkv

    if spec.gpu_budget is not None and spec.kv_gpu_budget is None:
        _offload_family(spec, contexts, systems, total_steps, record, log)
        return
    log(f"loading {spec.model} for tierkv")
    llm = tierkv.load(spec.model, device=spec.device, dtype=spec.dtype)
    if spec.model in SHAPES:  # random weights: any length is as good as another
        llm.cfg = dataclasses.replace(llm.cfg, max_position_embeddings=max(contexts) + total_steps + 8)
    weights = weight_bytes(llm.cfg, spec.dtype)
    for c in contexts:
        for s in systems:
            log(f"{s} at {format_context(c)}")
            record(_guard(s, c, lambda m=llm, s=s, c=c: run_tierkv(m, s, c, spec, weights)))
    del llm
    free_memory(spec.device)


def _offload_family(spec, contexts, systems, total_steps, record, log) -> None:
    """Under --gpu-budget: one load per (context, system), since the plan (which layers stay resident, the KV
    split) depends on both the context and the attention mode; the row carries the plan's predicted ms/token."""
    import tierkv

    for c in contexts:
        for s in systems:
            attention = "sparse" if s.startswith("tierkv-sparse") else "full"
            log(f"loading {spec.model} under gpu budget {format_size(spec.gpu_budget)} for {s} at {format_context(c)}")
            extra = sparse_settings(spec) if attention == "sparse" else {}
            given = given_shape(spec)
            try:
                llm = tierkv.load(spec.model, device=spec.device, dtype=spec.dtype, gpu_budget=spec.gpu_budget,
                                  ctx_size=c + total_steps + 8, cpu_budget=spec.cpu_budget, disk_dir=spec.disk_dir,
                                  attention=attention, prefill_chunk=spec.prefill_chunk, progress=True, **given,
                                  **extra)
            except TierKVError as e:
                record(Row(s, c, status="cannot_run", reason=str(e)))
                continue
            if spec.model in SHAPES:
                llm.cfg = dataclasses.replace(llm.cfg, max_position_embeddings=c + total_steps + 8)
            log(f"plan: {llm.plan.count('gpu')} resident, {llm.plan.count('host')} host, {llm.plan.count('disk')} "
                f"disk, {llm.plan.count('cpu')} cpu layers; predicted {llm.plan.timing.ms_per_token:.2f} ms/token")
            row = _guard(s, c, lambda m=llm, s=s, c=c: run_tierkv(m, s, c, spec, weight_bytes(m.cfg, spec.dtype)))
            record(row)
            if row.decode_ms:
                log(f"{s} at {format_context(c)}: {row.decode_ms['median']:.2f} ms/token measured, plan "
                    f"{row.plan_ms:.2f}, weights bound {_fmt_ms(row.weights_bound_ms)}, "
                    f"link bound {_fmt_ms(row.link_bound_ms)}")
            llm.unload()
            del llm
            free_memory(spec.device)


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def _hf_family(spec, cfg, contexts, total_steps, record) -> None:
    systems = [s for s in spec.systems if s in HF_SYSTEMS and s != "hf-accelerate"]
    if systems and contexts:
        pairs = [(s, c) for c in contexts for s in systems]
        for row in isolated_rows(pairs, _hf_worker, (spec, cfg, max(contexts) + total_steps + 8)):
            record(row)
    if "hf-accelerate" in spec.systems:
        from tierkv.bench import hf

        for c in contexts:
            record(_guard("hf-accelerate", c, lambda: hf.run_accelerate(cfg, c, spec, weight_bytes(cfg, spec.dtype))))


def _hf_worker(conn, pairs, spec, cfg, max_positions: int) -> None:
    """Child process: build the transformers model once, then measure each (system, context) and send its row."""
    from tierkv.bench import hf

    def log(msg: str) -> None:
        print(f"bench decode: {msg}", file=sys.stderr, flush=True)

    model, hf_cfg = None, None
    try:
        log(f"building the transformers model of {spec.model}")
        model, hf_cfg = hf.build_hf(spec, cfg, max_positions, spec.device)
    except ImportError as e:
        hf_cfg = f"transformers cannot build it ({e})"
    except Exception as e:  # OOM or an unsupported config: every row says why
        hf_cfg = f"building the transformers model failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        print(traceback.format_exc(), file=sys.stderr)
    for s, c in pairs:
        log(f"{s} at {format_context(c)}")
        send_row(conn, _guard(s, c, lambda: hf.run_hf(s, model, hf_cfg, cfg, c, spec)))
    conn.close()


def _guard(system: str, context: int, fn: Callable[[], Row]) -> Row:
    """fn(), or an 'error' row when it raised something unexpected (traceback on stderr, run continues)."""
    try:
        return fn()
    except TierKVError as e:
        return Row(system, context, status="cannot_run", reason=str(e))
    except Exception as e:
        print(traceback.format_exc(), file=sys.stderr)
        return Row(system, context, status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def finish_row(row: Row, rates: Rates, cfg: ModelConfig, spec: DecodeSpec) -> None:
    """Add the floor, measured/floor, the hidden-copy estimate and the budget verdict to a measured row."""
    if row.status != "ok" or not row.decode_ms:
        return
    weights = row.settings.get("weights_on_gpu_bytes", streamed_weight_bytes(cfg, spec.dtype))
    moved = {"weights_hbm": float(weights), **(row.bytes_per_token or {})}
    row.floor_ms, row.floor_parts_ms = floor_ms(moved, rates)
    row.measured_over_floor = row.decode_ms["median"] / row.floor_ms if row.floor_ms else None
    if row.bytes_source == "tier stats":
        link_ms = sum(ms for pair, ms in row.floor_parts_ms.items() if pair not in LINK_FREE)
        disk = sum(v for pair, v in (row.bytes_per_token or {}).items() if pair.startswith("disk"))
        if row.settings.get("reads") and not disk:  # zero-copy: GPU kernels read the host memory in place
            row.copy_hidden_note = (f"not measured: K/V cross the host link as reads {row.settings['reads']}, "
                                    "which the host never waits on; their time is GPU time (see --profile)")
        elif link_ms > 0 and row.io_wait_ms_per_token is not None:
            row.copy_hidden_share = min(1.0, max(0.0, 1.0 - row.io_wait_ms_per_token / link_ms))
            row.copy_hidden_note = HIDDEN_NOTE
        else:
            row.copy_hidden_note = "nothing crossed the host link or disk during the measured steps"
    else:
        row.copy_hidden_note = "not measured for this system"
    w = row.weights or {}
    if w.get("streamed_bytes_per_token") is not None:
        gpu_read = streamed_weight_bytes(cfg, spec.dtype) - w["bytes"]["cpu"]
        row.weights_bound_ms = 1e3 * max(w["streamed_bytes_per_token"] / rates.h2d, gpu_read / rates.hbm)
        kv_link = (row.bytes_per_token or {}).get("host->device", 0.0)
        row.link_bound_ms = 1e3 * max((w["streamed_bytes_per_token"] + kv_link) / rates.h2d, gpu_read / rates.hbm)
    if spec.gpu_budget is not None and row.memory_kind == "cuda" and row.peak_memory_bytes is not None:
        row.within_budget = row.peak_memory_bytes <= spec.gpu_budget
        if not row.within_budget:
            row.status = "over_budget"
            row.reason = (f"peak {format_size(row.peak_memory_bytes)} > budget {format_size(spec.gpu_budget)} "
                          f"(measured anyway)")


def load_previous(path: str, model: str) -> dict | None:
    """The earlier --json document that --append adds to (None when the file does not exist yet)."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        old = json.loads(p.read_text())
    except ValueError:
        raise ConfigError(f"--append: {path!r} is not JSON; remove it or drop --append") from None
    if old.get("kind") != "decode" or old.get("model") != model:
        raise ConfigError(f"--append: {path!r} holds another benchmark or model; use a new --json file")
    return old


def merge_previous(doc: dict, old: dict | None) -> dict:
    """Rows of an earlier document that this run did not redo, kept (for runs split over several commands)."""
    if old is None:
        return doc
    have = {(r["system"], r["context"]) for r in doc["rows"]}
    kept = [r for r in old.get("rows", []) if (r["system"], r["context"]) not in have]
    rank = {s: i for i, s in enumerate(SYSTEMS)}
    doc["rows"] = sorted(kept + doc["rows"], key=lambda r: (r["context"], rank.get(r["system"], len(rank))))
    doc["contexts"] = sorted({r["context"] for r in doc["rows"]})
    doc["systems"] = list(dict.fromkeys([*old.get("systems", []), *doc["systems"]]))
    doc["earlier_runs"] = [*old.get("earlier_runs", []),
                           {k: old.get(k) for k in ("device", "date", "command")}]
    return doc


def record_fields(doc: dict, device) -> dict:
    """The document with device, date and command as its last keys."""
    for k in ("device", "date", "command"):
        doc.pop(k, None)
    doc.update(run_record(device))
    return doc
