"""Options shared by commands that load a model (device, dtype, tier budgets, attention settings)."""

from __future__ import annotations

import click

MODEL_HELP = "Hugging Face model folder, .gguf file or built-in shape (default: SmolLM2-135M-Instruct)."


def model_options(fn):
    """Decorate a command with --device, --dtype and the tier/attention flags."""
    options = [
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)."),
        click.option("--kv-gpu-budget", default=None, help="KV cache bytes on the GPU, e.g. 2GiB (default: no limit)."),
        click.option("--cpu-budget", default=None, help="KV cache bytes in pinned CPU memory, e.g. 16GiB."),
        click.option("--disk-dir", default=None, help="Directory for the disk tier (an NVMe path)."),
        click.option("--chunk-size", type=int, default=32, show_default=True, help="Tokens per KV chunk."),
        click.option("--no-graph", is_flag=True, help="Run decode eagerly instead of replaying a CUDA graph."),
        click.option("--prefill-chunk", type=int, default=2048, show_default=True,
                     help="Prompt tokens processed per prefill slice."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


TIER_FLAGS = ("kv_gpu_budget", "cpu_budget", "disk_dir", "chunk_size", "prefill_chunk")


def tier_settings(flags: dict) -> dict:
    """The TierConfig keyword arguments among parsed flags (removed from `flags`)."""
    return {name: flags.pop(name) for name in TIER_FLAGS if name in flags}
