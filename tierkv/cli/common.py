"""Options shared by commands that load a model (device, dtype, tier budgets, attention settings)."""

from __future__ import annotations

import click

from tierkv.errors import ConfigError

MODEL_HELP = "Hugging Face model folder, .gguf file or built-in shape (default: SmolLM2-135M-Instruct)."


def model_options(fn):
    """Decorate a command with --device, --dtype and the tier/attention flags."""
    options = [
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)."),
        click.option("--kv-gpu-budget", default=None, help="KV cache bytes on the GPU, e.g. 2GiB (default: no limit)."),
        click.option("--cpu-budget", default=None, help="KV cache bytes in pinned CPU memory, e.g. 16GiB."),
        click.option("--disk-dir", default=None, help="Directory for the disk tier (an NVMe path)."),
        click.option("--chunk-size", type=int, default=None, help="Tokens per KV chunk (default: TierConfig's)."),
        click.option("--attention", type=click.Choice(["full", "sparse"]), default=None,
                     help="full: attend to every chunk (exact); sparse: only the chunks selection picks."),
        click.option("--token-budget", default=None,
                     help="Sparse mode: tokens attended per step (e.g. 2048) or a fraction of the context (0.125)."),
        click.option("--rank", type=int, default=None, help="Sparse mode: rank of the low-rank key shadows."),
        click.option("--score-rank", type=int, default=None,
                     help="Sparse mode: rank per KV head of the index that scores chunks."),
        click.option("--sink-tokens", type=int, default=None, help="First tokens always attended (kept on the GPU)."),
        click.option("--window-tokens", type=int, default=None, help="Last tokens always attended (kept on the GPU)."),
        click.option("--gpu-chunk-cache", is_flag=True, default=None,
                     help="Sparse graph decode: keep earlier picks on the GPU (helps when picks repeat, as on real text)."),
        click.option("--prefetch-picks", is_flag=True, default=None,
                     help="Sparse graph decode: predict the next layer's picks and copy them to the GPU during this "
                          "layer's MLP (implies --gpu-chunk-cache)."),
        click.option("--no-graph", is_flag=True, help="Run decode eagerly instead of replaying a CUDA graph."),
        click.option("--prefill-chunk", type=int, default=2048, show_default=True,
                     help="Prompt tokens processed per prefill slice."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


TIER_FLAGS = ("kv_gpu_budget", "cpu_budget", "disk_dir", "chunk_size", "prefill_chunk", "attention", "token_budget",
              "rank", "score_rank", "sink_tokens", "window_tokens", "gpu_chunk_cache",
              "prefetch_picks")


def parse_token_budget(value: str | None) -> int | float | None:
    """'2048' -> 2048 tokens; '0.125' -> a fraction of the context; None stays None."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--token-budget {value!r} is neither a token count nor a fraction; use e.g. 2048 or 0.125") from None


def tier_settings(flags: dict) -> dict:
    """The TierConfig keyword arguments among parsed flags (removed from `flags`); unset flags keep defaults."""
    out = {name: flags.pop(name) for name in TIER_FLAGS if name in flags}
    if "token_budget" in out:
        out["token_budget"] = parse_token_budget(out["token_budget"])
    return {k: v for k, v in out.items() if v is not None}
