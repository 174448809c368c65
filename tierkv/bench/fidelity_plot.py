"""Plots of the fidelity benches: agreement and NLL change vs budget (bench/long_fidelity.py), and the passkey
grid (bench/passkey_sweep.py). matplotlib is the optional `plot` extra (tierkv/bench/plot.pyplot).
Redraw from a saved result: python -m tierkv.bench.fidelity_plot RESULT.json OUT.png
"""

from __future__ import annotations

import json
import sys

from tierkv.bench.common import format_context
from tierkv.bench.plot import pyplot

_STYLE = {"sparse": ("-", "o", "shipped"), "oracle": ("--", "s", "oracle")}


def plot_fidelity(doc: dict, path: str) -> None:
    """Two panels, top-1 agreement (%) and mean-NLL change (%) against the tokens attended per step (at the
    context's length), one colour per context: shipped selection solid, oracle dashed. Rows with an error are left
    out (the title says so). Writes a PNG to path."""
    plt = pyplot()
    fig, (ax_a, ax_n) = plt.subplots(1, 2, figsize=(11, 4.5))
    contexts = sorted({r["context"] for r in doc["rows"] if "budget" in r})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ticks: set[int] = set()
    for i, n in enumerate(contexts):
        for method, (line, marker, name) in _STYLE.items():
            pts = sorted((r["budget_tokens"], 100 * r["agreement"], 100 * r["nll_delta"]) for r in doc["rows"]
                         if r["context"] == n and r.get("method") == method and "agreement" in r)
            if not pts:
                continue
            ticks.update(p[0] for p in pts)
            label = f"{format_context(n)} {name}"
            for ax, k in ((ax_a, 1), (ax_n, 2)):
                ax.plot([p[0] for p in pts], [p[k] for p in pts], line, marker=marker, color=colors[i % len(colors)],
                        label=label, markersize=4)
    for ax, ylabel in ((ax_a, "top-1 agreement with full attention (%)"), (ax_n, "mean NLL change vs full (%)")):
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)], rotation=45, fontsize=7)
        ax.set_xlabel("tokens attended per step (at the context's length)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_n.axhline(0, color="black", linewidth=0.6)
    ax_a.legend(fontsize=7)
    refused = sorted({r["method"] for r in doc["rows"] if "error" in r})
    note = f"; not run: {', '.join(refused)} (refused)" if refused else ""
    fig.suptitle(f"{doc['model']}, {doc.get('steps')} teacher-forced positions{note}\n"
                 f"{doc.get('device', '')}, {str(doc.get('date', ''))[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(doc: dict, path: str) -> None:
    """One grid per method: rows are prompt lengths, columns depths; green retrieved, red missed, grey refused or
    not run. Writes a PNG to path."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    methods = list(dict.fromkeys(r["method"] for r in doc["rows"]))
    lengths = sorted({r["length"] for r in doc["rows"]})
    depths = sorted({r["depth"] for r in doc["rows"]})
    fig, axes = plt.subplots(1, len(methods), figsize=(1.2 + 0.6 * len(depths) * len(methods), 1.4 + 0.5 * len(lengths)),
                             squeeze=False)
    cmap = ListedColormap(["#bbbbbb", "#d9534f", "#5cb85c"])  # not run, missed, retrieved
    for ax, method in zip(axes[0], methods):
        grid = [[0] * len(depths) for _ in lengths]
        for r in doc["rows"]:
            if r["method"] == method and "retrieved" in r:
                grid[lengths.index(r["length"])][depths.index(r["depth"])] = 2 if r["retrieved"] else 1
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, aspect="auto")
        for y, line in enumerate(grid):
            for x, v in enumerate(line):
                ax.text(x, y, ("", "no", "yes")[v], ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks([x - 0.5 for x in range(1, len(depths))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(lengths))], minor=True)
        ax.grid(which="minor", color="white", linewidth=2)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [format_context(n) for n in lengths], fontsize=7)
        ax.set_xlabel("depth of the passkey")
        ax.set_title(method, fontsize=9)
    axes[0][0].set_ylabel("prompt tokens")
    fig.suptitle(f"passkey, {doc['model']} (green: retrieved, red: missed, grey: not run)\n"
                 f"{doc.get('device', '')}, {str(doc.get('date', ''))[:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    """RESULT.json OUT.png: the plot of a long_fidelity or passkey result."""
    if len(argv) != 2:
        sys.exit("usage: python -m tierkv.bench.fidelity_plot RESULT.json OUT.png")
    with open(argv[0]) as f:
        doc = json.load(f)
    (plot_passkey if doc.get("bench") == "passkey" else plot_fidelity)(doc, argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
