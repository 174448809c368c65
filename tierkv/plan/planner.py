"""The weights-and-KV planner: where each layer's weights live and how the GPU budget splits, chosen to minimise
predicted ms/token (issue 18). Config only: nothing is allocated or loaded.

Overlap model. Streamed layers are copied on their own stream into 2-3 GPU slots while earlier layers compute,
and prefetch runs across layer and token boundaries, so link, disk and GPU work overlap; CPU-computed layers do
not (the GPU waits for their activations). Per decode token:

    ms/token = max(link bytes / link bw, disk bytes / disk bw, GPU-read bytes / HBM bw) + CPU layer time

link bytes = streamed weights (host and disk layers) + KV read over the link (they share it); GPU-read bytes =
weights of every layer the GPU computes (resident or from a slot), lm_head and the KV/shadows/index in HBM;
CPU layer time = their weight bytes / host DRAM bw + CPU_HOP_S per layer for the activation round trips.

Choices, in order:
1. GPU memory first goes to what every plan needs: lm_head, activations, a workspace allowance and the KV parts
   that must be on the GPU (the sparse shadows and index, sliding-window rings). Then to whole layers, then to
   the KV pool (GPU-resident KV in full mode, resident values in sparse mode): a resident layer saves its bytes
   on the link every token, a byte of sparse KV pool saves only the share of picks it holds.
2. If not every layer fits, an untied embedding moves to host memory (decode gathers one row of it per token).
3. Layers that do not fit stream through `staging_slots` GPU slots of the largest layer: 2 when streamed layers
   are never adjacent, 3 when some are (a copy must run while the next streamed layer waits).
4. Streamed layers sit at floor((j + 1/2) * N / k), j < k: gaps between them, counted around the ring (prefetch
   crosses token boundaries, so layer N-1 precedes layer 0), differ by at most one layer, so each copy overlaps
   the resident layers before it; two streamed layers are adjacent only when k > N / 2.
5. Host memory holds the spilled layers before the KV (a layer on disk costs its bytes at disk speed every
   token; sparse KV on disk costs only its picks). Of the host layers, as many run on the CPU as minimise the
   predicted time: a CPU layer wins when host DRAM outruns the link.
6. With no attention mode given, full (exact) attention is kept unless sparse is predicted more than
   FULL_MARGIN times faster.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tierkv.config import ATTENTION_MODES, format_size
from tierkv.plan.inputs import PlanInputs
from tierkv.plan.kv import KVPlan, full_kv_plan, kv_fixed_gpu_bytes, kv_total_bytes, sparse_kv_plan
from tierkv.plan.result import Plan, PlanDoesNotFitError, Timing, TokenTraffic
from tierkv.plan.sizes import WORKSPACE_BYTES, WeightSizes, activation_bytes, weight_sizes

CPU_HOP_S = 40e-6  # a CPU layer sends its input down and q/k/v, attention output and MLP output across: ~10 us each
FULL_MARGIN = 1.10  # exact attention is worth up to 10% more predicted time
DISK_STAGING_SLOTS = 2  # pinned host buffers of one layer each, so a disk read overlaps the copy before it


class _NoFit(Exception):
    def __init__(self, what: str, min_gpu: int, min_cpu: int) -> None:
        super().__init__(what)
        self.what, self.min_gpu, self.min_cpu = what, min_gpu, min_cpu


@dataclass(frozen=True)
class _Weights:
    """How many layers go where (positions come later) and what that costs in memory."""

    resident: int
    host: int  # host-resident layers: streamed or CPU-computed (split by _best_cpu_count)
    disk: int
    embedding: str
    slots: int
    layer_bytes: int


def make_plan(inp: PlanInputs) -> Plan:
    """The fastest predicted plan that fits the budgets; raises PlanDoesNotFitError naming the smallest budgets."""
    modes = (inp.attention,) if inp.attention else ATTENTION_MODES
    plans, misses = [], []
    for mode in modes:
        try:
            plans.append(_plan_mode(inp, mode))
        except _NoFit as miss:
            misses.append((mode, miss))
    if not plans:
        raise _does_not_fit(inp, misses)
    if len(plans) == 1:
        return plans[0]
    full, sparse = plans
    keep_full = full.timing.ms_per_token <= FULL_MARGIN * sparse.timing.ms_per_token
    why = (f"attention {'full' if keep_full else 'sparse'}: full (exact) predicts {full.timing.ms_per_token:.2f} "
           f"ms/token, sparse {sparse.timing.ms_per_token:.2f}; full is kept unless sparse is more than "
           f"{FULL_MARGIN:.2f}x faster")
    chosen = full if keep_full else sparse
    return replace(chosen, reasons=(why, *chosen.reasons))


def _plan_mode(inp: PlanInputs, mode: str) -> Plan:
    ws = weight_sizes(inp.model, inp.elem_bytes)
    fixed = _fixed_gpu(inp, mode, ws)
    w = _place_weights(inp, ws, sum(fixed.values()), kv_total_bytes(inp))
    gpu_used = sum(fixed.values()) + w.resident * w.layer_bytes + w.slots * w.layer_bytes \
        + (ws.embedding if w.embedding == "gpu" and ws.lm_head else 0)
    disk_staging = DISK_STAGING_SLOTS * w.layer_bytes if w.disk else 0
    host_used = w.host * w.layer_bytes + (ws.embedding if w.embedding == "host" else 0) + disk_staging
    plan_kv = full_kv_plan if mode == "full" else sparse_kv_plan
    disk_free = inp.disk_budget - w.disk * w.layer_bytes
    kv = plan_kv(inp, gpu_free=inp.gpu_budget - gpu_used, host_free=inp.cpu_budget - host_used, disk_free=disk_free)
    if disk_free < 0 or kv.disk_bytes > disk_free:
        spilled = (w.host + w.disk) * w.layer_bytes + (ws.embedding if w.embedding == "host" else 0)
        kv_need = kv.host_bytes + kv.disk_bytes
        raise _NoFit(f"host memory for {w.host + w.disk} spilled layers and {format_size(kv_need)} of KV",
                     inp.gpu_budget, spilled + max(0, kv_need - inp.disk_budget))
    n_cpu = _best_cpu_count(inp, ws, w, kv)
    layers = _positions(inp.model.num_layers, w, n_cpu)
    traffic = _traffic(ws, w, n_cpu, kv)
    timing = _timing(inp, traffic, n_cpu)
    gpu = {**fixed, "weights": w.resident * w.layer_bytes,
           "embedding": ws.embedding if w.embedding == "gpu" and ws.lm_head else 0,
           "staging": w.slots * w.layer_bytes, "kv_pool": kv.gpu_pool_bytes}
    host = {"streamed_weights": (w.host - n_cpu) * w.layer_bytes, "cpu_weights": n_cpu * w.layer_bytes,
            "embedding": ws.embedding if w.embedding == "host" else 0, "kv": kv.host_bytes,
            "disk_staging": disk_staging}
    reasons = _weight_reasons(inp, ws, w, n_cpu) + kv.reasons + (_bound_reason(timing),)
    return Plan(model=inp.model.name or inp.model.model_type, context=inp.context, dtype=inp.dtype, attention=mode,
                token_budget_tokens=kv.budget_tokens, layers=layers, layer_bytes=ws.layer, embedding=w.embedding,
                staging_slots=w.slots, gpu=gpu, host=host,
                disk={"weights": w.disk * w.layer_bytes, "kv": kv.disk_bytes}, traffic=traffic, timing=timing,
                budgets={"gpu": inp.gpu_budget, "cpu": inp.cpu_budget, "disk": inp.disk_budget},
                bandwidths=inp.bandwidths.to_json(), reasons=reasons)


def _fixed_gpu(inp: PlanInputs, mode: str, ws: WeightSizes) -> dict[str, int]:
    """GPU bytes every placement needs: lm_head (the embedding when tied, since lm_head reads it), final norm,
    activations, the workspace allowance, and the KV parts that must be on the GPU in this mode."""
    return {"lm_head": (ws.lm_head or ws.embedding) + ws.final_norm,
            "activations": activation_bytes(inp.model, inp.elem_bytes, inp.sparse.prefill_chunk),
            "workspace": WORKSPACE_BYTES, "kv_fixed": kv_fixed_gpu_bytes(inp, mode)}


def _adjacent(n: int, streamed: int) -> bool:
    """Whether evenly spread streamed layers (rule 4) include two neighbours, around the ring."""
    return streamed > n - streamed


def _place_weights(inp: PlanInputs, ws: WeightSizes, fixed: int, kv_total: int) -> _Weights:
    """Counts of resident / host / disk layers, the embedding's place and the staging slots (rules 1-3, 5).
    kv_total: KV bytes the host holds when the GPU keeps none of them (for the smallest budgets)."""
    n, size = len(ws.layer), max(ws.layer)
    room = inp.gpu_budget - fixed
    untied = ws.embedding if ws.lm_head else 0  # a tied embedding is lm_head's table, already counted
    if n * size + untied <= room:
        return _Weights(n, 0, 0, "gpu", 0, size)
    if n * size <= room:
        return _Weights(n, 0, 0, "host", 0, size)
    slots = 2
    resident = max(0, (room - slots * size) // size)
    if _adjacent(n, n - resident):
        slots = 3
        resident = max(0, (room - slots * size) // size)
    if room < slots * size:
        raise _NoFit("the GPU cannot hold lm_head, activations and the staging slots",
                     fixed + 3 * size, n * size + untied + max(0, kv_total - inp.disk_budget))
    spilled = n - resident
    host_room = inp.cpu_budget - untied
    host = min(spilled, max(0, host_room // size))
    if host < spilled:
        host = min(spilled, max(0, (host_room - DISK_STAGING_SLOTS * size) // size))
    return _Weights(resident, host, spilled - host, "host" if untied else "gpu", slots, size)


def _traffic(ws: WeightSizes, w: _Weights, n_cpu: int, kv: KVPlan) -> TokenTraffic:
    """Bytes per decode token on each path for this split."""
    n = w.resident + w.host + w.disk
    streamed = (w.host - n_cpu + w.disk) * w.layer_bytes
    lm_head = (ws.lm_head or ws.embedding) + ws.final_norm
    return TokenTraffic(hbm_weights=(n - n_cpu) * w.layer_bytes + lm_head, hbm_kv=kv.hbm_per_token,
                        link_weights=streamed, link_kv=kv.link_per_token, disk_weights=w.disk * w.layer_bytes,
                        disk_kv=kv.disk_per_token, cpu_weights=n_cpu * w.layer_bytes)


def _timing(inp: PlanInputs, t: TokenTraffic, n_cpu: int) -> Timing:
    bw = inp.bandwidths
    return Timing(link_ms=1e3 * (t.link_weights + t.link_kv) / bw.link,
                  disk_ms=1e3 * (t.disk_weights + t.disk_kv) / bw.disk,
                  hbm_ms=1e3 * (t.hbm_weights + t.hbm_kv) / bw.hbm,
                  cpu_ms=1e3 * (t.cpu_weights / bw.cpu + n_cpu * CPU_HOP_S))


def _best_cpu_count(inp: PlanInputs, ws: WeightSizes, w: _Weights, kv: KVPlan) -> int:
    """How many host layers to compute on the CPU: the count with the least predicted time (ties: fewer)."""
    return min(range(w.host + 1), key=lambda c: (_timing(inp, _traffic(ws, w, c, kv), c).ms_per_token, c))


def spread(n: int, k: int) -> list[int]:
    """k of positions 0..n-1, evenly spread: floor((j + 1/2) * n / k) for j < k (rule 4)."""
    return [((2 * j + 1) * n) // (2 * k) for j in range(k)]


def _positions(n: int, w: _Weights, n_cpu: int) -> tuple[str, ...]:
    """Per-layer places: non-resident layers spread over the stack; within them disk, then CPU layers spread."""
    layers = ["gpu"] * n
    spilled = spread(n, n - w.resident)
    disk = {spilled[i] for i in spread(len(spilled), w.disk)}
    rest = [p for p in spilled if p not in disk]
    cpu = {rest[i] for i in spread(len(rest), n_cpu)}
    for p in spilled:
        layers[p] = "disk" if p in disk else "cpu" if p in cpu else "host"
    return tuple(layers)


def _weight_reasons(inp: PlanInputs, ws: WeightSizes, w: _Weights, n_cpu: int) -> tuple[str, ...]:
    n, size = len(ws.layer), w.layer_bytes
    out = []
    if w.resident == n:
        out.append(f"all {n} layers ({format_size(n * size)}) fit the GPU budget: nothing streams")
    else:
        k = n - w.resident
        gap = n / k
        out.append(f"{w.resident} of {n} layers stay resident; {k} ({format_size(k * size)}) spill, spread evenly "
                   f"(one every {gap:.1f} layers) so each copy overlaps the resident layers before it")
        out.append(f"{w.slots} staging slots of {format_size(size)}: "
                   + ("some streamed layers are adjacent" if w.slots == 3 else "no two streamed layers are adjacent"))
    if w.embedding == "host":
        out.append(f"embedding ({format_size(ws.embedding)}) in host memory: decode gathers one row "
                   f"({format_size(inp.model.hidden_size * inp.elem_bytes)}) per token, and its GPU bytes hold "
                   f"{ws.embedding / size:.1f} more layers")
    if w.host:
        bw = inp.bandwidths
        side = "faster than" if bw.cpu > bw.link else "slower than"
        out.append(f"{n_cpu} of {w.host} host layers computed on the CPU: host DRAM ({bw.cpu / 1e9:.0f} GB/s) is "
                   f"{side} the link ({bw.link / 1e9:.0f} GB/s)")
    if w.disk:
        out.append(f"{w.disk} layers stream from disk: cpu_budget holds only {w.host} of the spilled layers")
    return tuple(out)


def _bound_reason(t: Timing) -> str:
    parts = f"link {t.link_ms:.2f} ms, disk {t.disk_ms:.2f} ms, HBM {t.hbm_ms:.2f} ms"
    return (f"predicted {t.ms_per_token:.2f} ms/token = max({parts}) + CPU {t.cpu_ms:.2f} ms; "
            f"{t.bound} binds")


def _does_not_fit(inp: PlanInputs, misses: list[tuple[str, _NoFit]]) -> PlanDoesNotFitError:
    """One error naming what did not fit and the smallest budgets that would: when the GPU budget is the problem
    in every mode, the smallest gpu_budget (with the cpu_budget that needs); else the smallest cpu_budget at this
    gpu_budget."""
    name = inp.model.name or inp.model.model_type
    gpu_short = all(m.min_gpu > inp.gpu_budget for _, m in misses)
    mode, miss = min(misses, key=lambda pair: (pair[1].min_gpu, pair[1].min_cpu) if gpu_short
                     else (pair[1].min_gpu > inp.gpu_budget, pair[1].min_cpu))
    if gpu_short:
        fix = (f"the smallest that fits is gpu_budget={format_size(miss.min_gpu)} with every layer streamed "
               f"({mode} attention) and cpu_budget={format_size(miss.min_cpu)}; raise --gpu-budget")
    else:
        fix = (f"it needs cpu_budget={format_size(miss.min_cpu)} at gpu_budget={format_size(inp.gpu_budget)} "
               f"({mode} attention); raise --cpu-budget or --gpu-budget, or give --disk-budget")
    return PlanDoesNotFitError(f"{name} at {inp.context} tokens does not fit gpu_budget={format_size(inp.gpu_budget)}, "
                               f"cpu_budget={format_size(inp.cpu_budget)} ({miss.what}): {fix}",
                               miss.min_gpu, miss.min_cpu)
