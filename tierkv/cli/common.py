"""Options shared by commands that load a model (device, dtype, tier budgets, attention settings)."""

from __future__ import annotations

import click

MODEL_HELP = "Hugging Face model folder, .gguf file or built-in shape (default: SmolLM2-135M-Instruct)."


def model_options(fn):
    """Decorate a command with --device, --dtype and the tier/attention flags."""
    options = [
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)."),
        click.option("--no-graph", is_flag=True, help="Run decode eagerly instead of replaying a CUDA graph."),
        click.option("--prefill-chunk", type=int, default=2048, show_default=True,
                     help="Prompt tokens processed per prefill slice."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def tier_settings(prefill_chunk: int) -> dict:
    """The TierConfig keyword arguments from parsed flags."""
    return {"prefill_chunk": prefill_chunk}
