"""--plot: one line per system over the contexts it measured; over-budget points are drawn, not dropped."""

import pytest

from tierkv.bench.plot import plot_decode


def test_plot_writes_a_png_with_every_measured_system(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"system": "tierkv-sparse", "context": 32768, "status": "ok", "decode_ms": {"median": 14.0}},
        {"system": "tierkv-sparse", "context": 262144, "status": "over_budget", "decode_ms": {"median": 17.8}},
        {"system": "hf-offloaded", "context": 32768, "status": "ok", "decode_ms": {"median": 248.0}},
        {"system": "hf-offloaded", "context": 262144, "status": "oom", "decode_ms": None},
    ]
    doc = {"model": "llama3.1-8b", "rows": rows, "settings": {"gpu_budget": 24 << 30}, "device": "cpu", "date": "x"}
    out = tmp_path / "decode.png"
    plot_decode(doc, str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.pyplot as plt
    assert not plt.get_fignums()  # the figure is closed, not leaked
