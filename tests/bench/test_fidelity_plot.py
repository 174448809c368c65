"""The fidelity plots: agreement / NLL change vs budget per context (refused rows left out, named in the title),
and the passkey grid."""

import pytest

from tierkv.bench.fidelity_plot import plot_fidelity, plot_passkey


def png_written(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_fidelity_plot_draws_shipped_and_oracle_per_context(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = [{"context": 8192, "method": "full", "nll": 1.0}]
    for n in (8192, 16384):
        for tokens in (512, 1024, 2048):
            rows.append({"context": n, "budget": str(tokens), "budget_tokens": tokens, "method": "oracle",
                         "agreement": 0.9 + tokens / 1e5, "nll_delta": 0.01 - tokens / 1e6})
            rows.append({"context": n, "budget": str(tokens), "budget_tokens": tokens, "method": "sparse",
                         "error": "refused"})
    doc = {"model": "gemma3", "steps": 256, "rows": rows, "device": "cpu", "date": "2026-12-05"}
    out = tmp_path / "fidelity.png"
    plot_fidelity(doc, str(out))
    assert png_written(out) and not plt.get_fignums()


def test_passkey_plot_draws_a_grid_per_method(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = [{"length": n, "depth": d, "method": m, **({"error": "refused"} if m == "sparse" else {"retrieved": d < 0.5})}
            for n in (8192, 16384) for d in (0.1, 0.5, 0.9) for m in ("full", "sparse")]
    out = tmp_path / "passkey.png"
    plot_passkey({"model": "gemma3", "rows": rows, "device": "cpu", "date": "2026-12-05"}, str(out))
    assert png_written(out) and not plt.get_fignums()
