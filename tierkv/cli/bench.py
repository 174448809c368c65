"""`tierkv bench`: `io` measures the machine's tiers; `decode` runs tierkv and the transformers baselines side by
side at several contexts, with floors. Both print a table, optionally write --json, and end with one JSON line.
"""

from __future__ import annotations

from pathlib import Path

import click

from tierkv.cli.common import FLOOR_HELP, TOKEN_BUDGET_HELP, parse_token_budget
from tierkv.config import TierConfig, parse_size
from tierkv.errors import ConfigError

DEFAULT_SIZES = "64KiB,1MiB,16MiB,256MiB"


@click.group("bench")
def command() -> None:
    """Benchmarks: `io` (bandwidth of each tier) and `decode` (ms/token against the baselines)."""


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def _write_json(path: str | None, text: str) -> None:
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{path}.tmp")
            tmp.write_text(text + "\n")
            tmp.replace(path)  # whole files only: a run killed mid-write leaves the last complete one
        except OSError as e:
            raise ConfigError(f"--json {path!r} cannot be written ({e.strerror}); give a writable path") from None


@command.command("io")
@click.option("--json", "json_path", default=None, help="Write the full results as JSON to this file.")
@click.option("--sizes", default=DEFAULT_SIZES, show_default=True, help="Transfer sizes, comma separated.")
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed repeats per measurement.")
@click.option("--disk-dir", default=None, help="Directory for the disk read file (default: the tierkv cache dir).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def io_command(json_path, sizes, repeats, disk_dir, device) -> None:
    """Host<->device (pinned, pageable), device->device, disk reads (kvikio, POSIX), scattered chunk reads."""
    from tierkv.bench.common import bench_device, parse_sizes
    from tierkv.bench.decode import record_fields
    from tierkv.bench.io import run_io
    from tierkv.bench.report import dumps, io_table, summary_line
    from tierkv.plan.bandwidth import save_io_probe

    if repeats < 1:
        raise ConfigError(f"--repeats {repeats} must be at least 1")
    dev = bench_device(device)
    doc = run_io(dev, parse_sizes(sizes), repeats, disk_dir, progress=lambda s: _echo_err(f"bench io: {s}"))
    doc = record_fields(doc, dev)
    save_io_probe(doc)  # `tierkv plan` takes its bandwidths from the latest probe
    click.echo(io_table(doc))
    _write_json(json_path, dumps(doc))
    click.echo(summary_line(doc))


@command.command("decode")
@click.argument("model")
@click.option("--context", "contexts", default="32K,128K", show_default=True, help="Contexts, e.g. 1K,32K,128K (K=1024).")
@click.option("--gpu-budget", default=None, help="Whole GPU budget (weights + KV + work), e.g. 24GiB.")
@click.option("--kv-gpu-budget", default=None, help="KV bytes on the GPU for tierkv (default: from --gpu-budget).")
@click.option("--reserve", default="4GiB", show_default=True, help="GPU bytes kept for activations under --gpu-budget.")
@click.option("--cpu-budget", default=None, help="KV bytes in pinned CPU memory for tierkv (default: half of free RAM).")
@click.option("--disk-dir", default=None, help="Disk tier directory for tierkv (an NVMe path).")
@click.option("--steps", type=int, default=16, show_default=True, help="Measured decode steps (median reported).")
@click.option("--warmup", type=int, default=4, show_default=True, help="Decode steps before measuring.")
@click.option("--systems", default=None, help="Comma list (default: all but tierkv-sparse-prefetch and tierkv-dense): "
                                              "tierkv-sparse, tierkv-sparse-prefetch, tierkv-sparse-eager, tierkv-exact "
                                              "(full attention over the tiers), tierkv-dense (full attention, every K/V "
                                              "on the device), hf-default, hf-offloaded, hf-accelerate.")
@click.option("--token-budget", default=None, help=TOKEN_BUDGET_HELP)
@click.option("--budget-floor-tokens", type=int, default=None, help=FLOOR_HELP)
@click.option("--rank", type=int, default=None, help="Sparse: the key shadow's rank (default: tierkv's for the model).")
@click.option("--score-rank", type=int, default=None,
              help="Sparse: the chunk index's rank per KV head (default: tierkv's for the model).")
@click.option("--chunk-size", type=int, default=None, help="Tokens per KV chunk (default: tierkv's for the model).")
@click.option("--prefill-chunk", type=int, default=2048, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu).")
@click.option("--io-json", default=None, help="Take link and disk bandwidths for the floor from `bench io --json`.")
@click.option("--hbm-gbps", type=float, default=None, help="Weight-stream bandwidth for the floor (default: measured).")
@click.option("--json", "json_path", default=None, help="Write the full results as JSON to this file.")
@click.option("--append", is_flag=True, help="Keep rows of an existing --json file that this run does not redo.")
@click.option("--plot", "plot_path", default=None, help="Write ms/token vs context as a PNG (needs matplotlib).")
@click.option("--profile", is_flag=True, help="Profile 4 extra steps per row after the measured ones; print top ops.")
def decode_command(model, contexts, gpu_budget, kv_gpu_budget, reserve, cpu_budget, disk_dir, steps, warmup, systems,
                   token_budget, budget_floor_tokens, rank, score_rank, chunk_size, prefill_chunk, device, dtype,
                   io_json, hbm_gbps, json_path, append, plot_path, profile) -> None:
    """Decode ms/token of tierkv and the transformers baselines for MODEL (a folder, .gguf or built-in shape)."""
    from tierkv.bench import decode as dec
    from tierkv.bench.common import bench_device, parse_contexts
    from tierkv.bench.report import decode_table, dumps, profiles, summary_line
    from tierkv.bench.systems import DEFAULT_SYSTEMS, SYSTEMS, DecodeSpec
    from tierkv.llm import resolve_dtype

    if steps < 1 or warmup < 1:
        raise ConfigError(f"--steps {steps} and --warmup {warmup} must be at least 1")
    names = tuple(s.strip() for s in systems.split(",")) if systems else DEFAULT_SYSTEMS
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        raise ConfigError(f"--systems: {', '.join(unknown)} unknown; choose from {', '.join(SYSTEMS)}")
    if plot_path:
        _check_matplotlib()
    dev = bench_device(device)
    asked = {"token_budget": parse_token_budget(token_budget),
             "budget_floor_tokens": budget_floor_tokens, "rank": rank or None, "score_rank": score_rank,
             "chunk_size": chunk_size}
    TierConfig(**{k: v for k, v in asked.items() if v is not None})  # refuses a bad value before any model loads
    spec = DecodeSpec(model=model, contexts=parse_contexts(contexts), device=dev, dtype=resolve_dtype(dtype, dev),
                      systems=names, gpu_budget=parse_size(gpu_budget, "--gpu-budget"),
                      kv_gpu_budget=parse_size(kv_gpu_budget, "--kv-gpu-budget"),
                      cpu_budget=parse_size(cpu_budget, "--cpu-budget"), disk_dir=disk_dir,
                      reserve=parse_size(reserve, "--reserve"), steps=steps, warmup=warmup,
                      prefill_chunk=prefill_chunk, profile=profile,
                      **{k: v for k, v in asked.items() if v is not None})
    previous = dec.load_previous(json_path, model) if append and json_path else None

    def finish(d: dict) -> dict:
        return dec.merge_previous(dec.record_fields(d, dev), previous)

    def save_partial(d: dict) -> None:  # each finished row reaches --json at once: a cut-short run keeps its rows
        _write_json(json_path, dumps(finish(d)))

    doc = dec.run_decode(spec, io_json=io_json, hbm_gbps=hbm_gbps, log=lambda s: _echo_err(f"bench decode: {s}"),
                         on_partial=save_partial if json_path else None)
    doc = finish(doc)
    click.echo(decode_table(doc))
    if profile:
        click.echo(profiles(doc))
    _write_json(json_path, dumps(doc))
    if plot_path:
        from tierkv.bench.plot import plot_decode

        plot_decode(doc, plot_path)
    click.echo(summary_line(doc))


def _check_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib; pip install 'tierkv[plot]' (or matplotlib) or drop --plot")
