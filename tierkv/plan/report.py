"""A Plan as the table `tierkv plan` prints: layer groups, the memory split, bytes per token, the bound, reasons."""

from __future__ import annotations

from tierkv.config import format_size
from tierkv.plan.result import Plan

GPU_PARTS = (("weights", "resident layers"), ("lm_head", "lm_head + final norm"), ("embedding", "embedding"),
             ("kv_fixed", "KV fixed (shadows, index, key ring, window rings)"), ("kv_pool", "KV pool"),
             ("staging", "staging slots"), ("activations", "activations"), ("workspace", "workspace allowance"))
HOST_PARTS = (("streamed_weights", "streamed layers (pinned)"), ("cpu_weights", "CPU-computed layers"),
              ("embedding", "embedding"), ("kv", "KV"), ("disk_staging", "disk staging (pinned)"))


def _layer_rows(plan: Plan) -> list[str]:
    rows = [f"{'layers':<9} {'where':<34} {'weights':>11} {'moved/token':>12}"]
    for g in plan.groups():
        span = str(g["first"]) if g["first"] == g["last"] else f"{g['first']}-{g['last']}"
        rows.append(f"{span:<9} {g['where']:<34} {format_size(g['weight_bytes']):>11} "
                    f"{format_size(g['link_bytes_per_token']):>12}")
    return rows


def _parts(title: str, parts: tuple[tuple[str, str], ...], values: dict[str, int], budget: int) -> list[str]:
    rows = [f"{title}: {format_size(sum(values.values()))} of {format_size(budget)}"]
    rows += [f"  {label:<50} {format_size(values[key]):>11}" for key, label in parts if values.get(key)]
    return rows


def format_plan(plan: Plan) -> str:
    """The human-readable plan (the same content as Plan.to_json)."""
    t, tr = plan.timing, plan.traffic
    b = plan.budgets
    head = (f"plan: {plan.model}, {plan.dtype}, {plan.context} tokens, attention {plan.attention} "
            f"({plan.token_budget_tokens} tokens attended per step), embedding on the "
            f"{'GPU' if plan.embedding == 'gpu' else 'host'}, lm_head on the GPU")
    lines = [head, "", *_layer_rows(plan), ""]
    lines += _parts("GPU", GPU_PARTS, plan.gpu, b["gpu"])
    if plan.staging_slots:
        lines.append(f"  ({plan.staging_slots} slots of {format_size(max(plan.layer_bytes))})")
    lines += _parts("host", HOST_PARTS, plan.host, b["cpu"])
    if any(plan.disk.values()):
        lines.append(f"disk: weights {format_size(plan.disk['weights'])}, KV {format_size(plan.disk['kv'])} "
                     f"of {format_size(b['disk'])}")
    lines += ["", "per token: link {} (weights {}, KV {}), HBM {} (weights {}, KV {}), disk {}, CPU {}".format(
        format_size(tr.link_weights + tr.link_kv), format_size(tr.link_weights), format_size(tr.link_kv),
        format_size(tr.hbm_weights + tr.hbm_kv), format_size(tr.hbm_weights), format_size(tr.hbm_kv),
        format_size(tr.disk_weights + tr.disk_kv), format_size(tr.cpu_weights)),
        f"predicted: {t.ms_per_token:.2f} ms/token, {t.bound}-bound (link {t.link_ms:.2f} ms, HBM {t.hbm_ms:.2f} ms, "
        f"disk {t.disk_ms:.2f} ms, then CPU {t.cpu_ms:.2f} ms)",
        "bandwidths: " + ", ".join(f"{k} {v:g} GB/s ({plan.bandwidths['source'].get(k, '')})"
                                   for k, v in plan.bandwidths["gbps"].items()),
        "", "why:"]
    lines += [f"  - {r}" for r in plan.reasons]
    return "\n".join(lines)
