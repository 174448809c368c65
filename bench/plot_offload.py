"""Weights offload at a glance (issue 18): decode ms/token per GPU budget beside the plan's prediction and the two
bounds, and transformers + accelerate where it ran, from committed `tierkv bench decode --json` or
`bench/weight_offload.py --out` files (one or more rows each).

    python bench/plot_offload.py bench/results/offload-8b-32k-*-s15.json \
        bench/results/offload-8b-32k-12GiB-hf-accelerate-h100-2026-12-06.json --out offload.png
"""

from __future__ import annotations

import argparse
import json

from tierkv.bench.plot import pyplot
from tierkv.config import format_size


def rows(paths: list[str]) -> list[dict]:
    """(budget, system, ms, plan, weights bound, link bound, over budget) of every measured row in the files."""
    out = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        for r in doc["rows"]:
            budget = r.get("budget") or (doc.get("settings") or {}).get("gpu_budget")
            if not r.get("decode_ms") or budget is None:
                continue
            out.append({"budget": budget, "system": r["system"], "ms": r["decode_ms"]["median"],
                        "plan": r.get("plan_ms"), "w": r.get("weights_bound_ms"), "link": r.get("link_bound_ms"),
                        "over": r.get("status") == "over_budget"})
    return sorted(out, key=lambda r: (r["budget"], r["system"]))


def plot(data: list[dict], path: str, title: str) -> None:
    plt = pyplot()
    budgets = sorted({r["budget"] for r in data})
    systems = list(dict.fromkeys(r["system"] for r in data))
    series = [(s, "ms") for s in systems] + [("tierkv plan", "plan"), ("weights bound", "w"), ("link bound", "link")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for k, (name, key) in enumerate(series):
        xs, ys = [], []
        for i, b in enumerate(budgets):
            pick = [r for r in data if r["budget"] == b and (r["system"] == name if key == "ms" else
                                                             r["system"].startswith("tierkv"))]
            if pick and pick[0][key] is not None:
                xs.append(i + (k - (len(series) - 1) / 2) * width)
                ys.append(pick[0][key])
        ax.bar(xs, ys, width, label=name, hatch="//" if key != "ms" else None, alpha=0.55 if key != "ms" else 1.0)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=7)
    over = [(i, r) for i, b in enumerate(budgets) for r in data if r["budget"] == b and r["over"]]
    for i, r in over:
        ax.annotate("peak over budget", (i, r["ms"]), xytext=(0, 14), textcoords="offset points", ha="center",
                    fontsize=7, color="firebrick")
    ax.set_xticks(range(len(budgets)), [f"gpu_budget {format_size(b)}" for b in budgets])
    ax.set_yscale("log")
    ax.set_ylabel("decode ms/token (median; log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--title", default="weights offload: decode ms/token by GPU budget")
    a = ap.parse_args()
    data = rows(a.files)
    plot(data, a.out, a.title)
    for r in data:
        print(f"{format_size(r['budget']):>10}  {r['system']:<14} {r['ms']:9.2f} ms  plan {r['plan']}  "
              f"w-bound {r['w']}  link-bound {r['link']}{'  (over budget)' if r['over'] else ''}")


if __name__ == "__main__":
    main()
