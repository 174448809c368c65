"""Terminal tables and JSON output for `tierkv bench io` and `tierkv bench decode`.

Sizes are formatted here only; the JSON keeps bytes, seconds and GB/s (1e9 bytes/s) as numbers.
"""

from __future__ import annotations

import json
import math
from typing import Iterable

from tierkv.bench.common import format_context
from tierkv.config import format_size

GIB = 1024**3


def _fmt(v, spec: str = ".2f", missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    return format(v, spec)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def io_table(doc: dict) -> str:
    """One line per (measurement, size): GB/s min / median / max; then what was skipped and why."""
    body = []
    for r in doc["results"]:
        what = r["name"] + (f" [{r['backend']}]" if "backend" in r else "")
        if "chunks" in r:
            what += f" ({r['chunks']} x {format_size(r['chunk_bytes'])})"
        g = r["gbps"]
        body.append([what, format_size(r["size"]), _fmt(g["min"]), _fmt(g["median"]), _fmt(g["max"])])
    out = _table(["measurement", "size", "GB/s min", "median", "max"], body)
    disk = next((r for r in doc["results"] if r["name"].startswith("disk")), None)
    if disk:
        out += f"\ndisk: {disk['dir']} ({disk['filesystem']}), page cache {disk['page_cache']}"
    for s in doc["skipped"]:
        out += f"\nskipped {s['name']}: {s['reason']}"
    return out


def _tier_shares(hit_rate: dict) -> tuple[float, float, float]:
    """(device, host, disk) shares of picks; the graph cache's GPU sources (chunk cache, resident copies) are the
    device's."""
    dev = sum(v for k, v in hit_rate.items() if k == "device" or k.startswith("gpu_"))
    return dev, hit_rate.get("host", 0.0), hit_rate.get("disk", 0.0)


def decode_table(doc: dict) -> str:
    """One line per (context, system); rows that did not run show their status and reason."""
    body, notes = [], []
    for r in doc["rows"]:
        ctx, name = format_context(r["context"]), r["system"]
        if not r.get("decode_ms"):
            body.append([ctx, name, r["status"]] + ["-"] * 12)
            notes.append(f"{name} @ {ctx}: {r['status']}: {r['reason']}")
            continue
        b = r.get("bytes_per_token") or {}
        link = b.get("host->device", 0.0) + b.get("device->host", 0.0)
        disk = sum(v for k, v in b.items() if "disk" in k)
        hr = r.get("hit_rate")
        hits = "/".join(_fmt(100 * x, ".0f") for x in _tier_shares(hr)) if hr else "-"
        peak = r["peak_memory_bytes"] / GIB if r.get("peak_memory_bytes") else None
        body.append([ctx, name, r["status"], _fmt(r["decode_ms"]["median"]), _fmt(r.get("prefill_tok_s"), ".0f"),
                     _fmt(peak) + ("" if r["memory_kind"] == "cuda" else " rss"), _fmt(link / 1e6, ".1f"),
                     _fmt(disk / 1e6, ".1f"), hits, _fmt(100 * r["copy_hidden_share"], ".0f")
                     if r.get("copy_hidden_share") is not None else "-", _fmt(r.get("floor_ms")),
                     _fmt(r.get("measured_over_floor"), ".1f"), _fmt(r.get("plan_ms")),
                     _fmt(r.get("weights_bound_ms")), _fmt(r.get("link_bound_ms"))])
        if r["status"] != "ok":
            notes.append(f"{name} @ {ctx}: {r['status']}: {r['reason']}")
    head = ["context", "system", "status", "ms/tok", "prefill tok/s", "peak GiB", "link MB/tok", "disk MB/tok",
            "hits d/h/disk %", "hidden %*", "floor ms", "x floor", "plan ms", "w-bound ms", "link-bound ms"]
    out = _table(head, body)
    out += ("\n* hidden %: estimate from host-side I/O waits (see copy_hidden_note); link MB/tok: bytes over the "
            "host link per token (measured from tier stats for tierkv, modelled for transformers); plan ms: the "
            "planner's prediction under --gpu-budget; w-bound ms: max(streamed weights / measured link, GPU-read "
            "weights / measured HBM); link-bound ms: the same with the K/V bytes that cross the link beside the "
            "weights")
    return out + "".join(f"\n{n}" for n in notes)


def profiles(doc: dict) -> str:
    """The profiler tables of rows that have one."""
    def stages(r: dict) -> str:
        st = r.get("profile_stages_ms")
        return ("by stage (kernel ms/token): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()) + "\n") if st else ""

    return "".join(f"\n--- profile: {r['system']} @ {format_context(r['context'])} ---\n{stages(r)}{r['profile']}"
                   for r in doc.get("rows", []) if r.get("profile"))


def dumps(doc: dict) -> str:
    """JSON with NaN/inf turned into null, so every reader can parse it."""
    return json.dumps(_clean(doc), allow_nan=False)


def summary_line(doc: dict) -> str:
    """The closing one-line JSON: device, date, command (and the headline numbers)."""
    head = {}
    if doc.get("kind") == "decode":
        head["ms_per_token"] = {f"{r['system']}@{format_context(r['context'])}":
                                (r["decode_ms"]["median"] if r.get("decode_ms") else r["status"]) for r in doc["rows"]}
    else:
        head["results"] = len(doc.get("results", []))
        head["skipped"] = len(doc.get("skipped", []))
    return dumps({"bench": doc.get("kind"), **head, "device": doc["device"], "date": doc["date"],
                  "command": doc["command"]})


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
