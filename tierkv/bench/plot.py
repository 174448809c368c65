"""--plot FILE.png: decode ms/token versus context, one line per system, log scale (matplotlib, optional extra);
`pyplot()` loads matplotlib for the other bench plots."""

from __future__ import annotations

from tierkv.bench.common import format_context
from tierkv.errors import ConfigError


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend. Raises ConfigError without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib; pip install 'tierkv[plot]' (or matplotlib) or drop --plot") from None
    return plt


def plot_decode(doc: dict, path: str) -> None:
    """Write the plot of a decode document's measured rows to path. Raises ConfigError without matplotlib."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    systems = list(dict.fromkeys(r["system"] for r in doc["rows"]))
    any_over = False
    for name in systems:
        pts = sorted((r["context"], r["decode_ms"]["median"], r["status"] == "over_budget") for r in doc["rows"]
                     if r["system"] == name and r.get("decode_ms"))
        if pts:
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=name)
            over = [p for p in pts if p[2]]  # measured anyway: drawn hollow, so one such point marks only itself
            if over:
                any_over = True
                ax.plot([p[0] for p in over], [p[1] for p in over], "o", color=line.get_color(), markersize=9,
                        markerfacecolor="white")
    contexts = sorted({r["context"] for r in doc["rows"]})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(contexts, [format_context(c) for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms/token (median)")
    budget = doc.get("settings", {}).get("gpu_budget")
    title = f"{doc['model']} decode" + (f", GPU budget {budget / 1024**3:.0f} GiB" if budget else "")
    ax.set_title(f"{title}\n{doc.get('device', '')}, {str(doc.get('date', ''))[:10]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="hollow: peak GPU memory over the budget" if any_over else None, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
