"""Options shared by commands that load a model (device, dtype, tier budgets, attention settings)."""

from __future__ import annotations

import click

from tierkv.config import TierConfig
from tierkv.errors import ConfigError

TOKEN_BUDGET_HELP = (f"Sparse mode: tokens attended per step (e.g. 2048) or a fraction of the context (default: "
                     f"{TierConfig.token_budget}, at least --budget-floor-tokens).")
FLOOR_HELP = (f"Sparse mode: a fractional --token-budget attends at least this many tokens (default: "
              f"{TierConfig.budget_floor_tokens}; 0: the fraction alone). No effect on a token count.")

MODEL_HELP = ("a Hugging Face model folder, a .gguf file, a Hugging Face id found in the local Hugging Face cache, "
              "a built-in shape (random weights) or smollm2 (the default, SmolLM2-135M-Instruct).")


def model_options(fn):
    """Decorate a command with --device, --dtype and the tier/attention flags."""
    options = [
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--ctx-size", type=int, default=None,
                     help="Cap the context (prompt + reply) at N tokens (default: the model's)."),
        click.option("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)."),
        click.option("--gpu-budget", default=None,
                     help="The whole GPU budget (weights, KV, staging, activations), e.g. 12GiB: the planner decides "
                          "which layers stay resident, stream from host memory or disk, or run on the CPU "
                          "(see `tierkv plan`); --kv-gpu-budget follows from it unless given."),
        click.option("--placement", default=None,
                     help="Force layer placement, e.g. 'host=3,7 disk=5 cpu=9' (others resident; places gpu, host, "
                          "disk, cpu). Disk layers are read from the checkpoint or a spill file in --disk-dir."),
        click.option("--kv-gpu-budget", default=None,
                     help="KV cache bytes on the GPU, e.g. 2GiB (default: from --gpu-budget, else no limit)."),
        click.option("--cpu-budget", default=None, help="KV cache bytes in pinned CPU memory, e.g. 16GiB."),
        click.option("--disk-dir", default=None, help="Directory for the disk tier (an NVMe path)."),
        click.option("--chunk-size", type=int, default=None, help="Tokens per KV chunk (default: TierConfig's)."),
        click.option("--attention", type=click.Choice(["full", "sparse"]), default=None,
                     help="full: attend to every chunk (exact); sparse: only the chunks selection picks."),
        click.option("--token-budget", default=None, help=TOKEN_BUDGET_HELP),
        click.option("--budget-floor-tokens", type=int, default=None, help=FLOOR_HELP),
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


# load() keywords that are not TierConfig fields: weight placement
LOAD_FLAGS = ("gpu_budget", "placement")
TIER_FLAGS = (*LOAD_FLAGS, "kv_gpu_budget", "cpu_budget", "disk_dir", "chunk_size", "prefill_chunk", "attention",
              "token_budget", "budget_floor_tokens",
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
    """The tierkv.load keyword arguments among parsed flags (TierConfig fields, gpu_budget, placement; removed
    from `flags`); unset flags keep defaults."""
    out = {name: flags.pop(name) for name in TIER_FLAGS if name in flags}
    if "token_budget" in out:
        out["token_budget"] = parse_token_budget(out["token_budget"])
    return {k: v for k, v in out.items() if v is not None}


def sampling_options(max_new_tokens: int):
    """Decorate a command with -n/--max-new-tokens and the sampling flags (read back by sampling_from_flags)."""
    options = [
        click.option("-n", "--max-new-tokens", type=int, default=None,
                     help=f"Tokens to generate at most (default: {max_new_tokens}, cut at the context's end)."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, default=1.0, show_default=True,
                     help="Keep the most likely tokens up to this probability mass (1: off)."),
        click.option("--min-p", type=float, default=0.0, show_default=True,
                     help="Drop tokens below this fraction of the top token's probability (0: off)."),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True,
                     help="Lower the logits of the last 64 tokens by this factor (1: off)."),
        click.option("--stop", multiple=True, help="End the reply before this text (repeatable)."),
        click.option("--seed", type=int, default=None, help="Seed for sampling (default: from the clock)."),
    ]

    def decorate(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return decorate


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "stop", "seed")


def sampling_from_flags(flags: dict, max_new_tokens: int):
    """A validated SamplingConfig from the parsed flags (removed from `flags`) and whether -n was given."""
    from tierkv.sample_config import SamplingConfig

    given_n = flags.pop("max_new_tokens")
    options = {name: flags.pop(name) for name in SAMPLING_FLAGS}
    options["stop"] = tuple(options["stop"])
    return SamplingConfig(max_new_tokens=max_new_tokens if given_n is None else given_n, **options), given_n is not None


def plan_note(llm) -> str | None:
    """One line on the plan a --gpu-budget load followed (None without one), for stderr."""
    plan = getattr(llm, "plan", None)
    if plan is None:
        return None
    where = ", ".join(f"{plan.count(p)} {p}" for p in ("gpu", "host", "disk", "cpu") if plan.count(p))
    return (f"plan: layers {where}; attention {plan.attention}; predicted {plan.timing.ms_per_token:.2f} ms/token "
            f"({plan.timing.bound}-bound); `tierkv plan` explains it")
