"""`tierkv plan MODEL`: where each layer's weights and the KV cache would live under the budgets, and the
predicted ms/token (tierkv/plan/). Reads configuration only; torch and transformers load inside the command."""

from __future__ import annotations

import json

import click

from tierkv.cli.common import FLOOR_HELP, TOKEN_BUDGET_HELP
from tierkv.errors import ConfigError

DEFAULT_CPU_SHARE = 0.8  # of the memory available now, when --cpu-budget is not given


@click.command("plan")
@click.argument("model")
@click.option("--gpu-budget", default=None, help="The whole GPU budget, e.g. 24GiB (default: the GPU's memory).")
@click.option("--cpu-budget", default=None, help="Host memory for weights and KV, e.g. 64GiB "
                                                 "(default: 80% of the memory available now).")
@click.option("--disk-budget", default="0", show_default=True, help="Disk bytes for weights and KV (0: no disk tier).")
@click.option("--context", default="32K", show_default=True, help="Context length in tokens (K = 1024).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--attention", type=click.Choice(["full", "sparse"]), default=None,
              help="Attention mode (default: the planner chooses).")
@click.option("--token-budget", default=None, help=TOKEN_BUDGET_HELP)
@click.option("--budget-floor-tokens", type=int, default=None, help=FLOOR_HELP)
@click.option("--prefill-chunk", type=int, default=None, help="Prompt tokens per prefill slice (sets activations).")
@click.option("--io-json", default=None, help="Bandwidths from this `tierkv bench io --json` file "
                                              "(default: the cached probe, else documented defaults).")
@click.option("--hbm-gbps", type=float, default=None, help="GPU weight-read rate, GB/s.")
@click.option("--link-gbps", type=float, default=None, help="Pinned host->device rate, GB/s.")
@click.option("--cpu-gbps", type=float, default=None, help="Host DRAM rate of CPU matrix-vector products, GB/s.")
@click.option("--disk-gbps", type=float, default=None, help="Disk read rate, GB/s.")
@click.option("--any-machine", is_flag=True, help="Plan for another machine: no checks against this one's memory, "
                                                 "default bandwidths unless --io-json.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def command(model, gpu_budget, cpu_budget, disk_budget, context, dtype, attention, token_budget, budget_floor_tokens,
            prefill_chunk, io_json, hbm_gbps, link_gbps, cpu_gbps, disk_gbps, any_machine, as_json) -> None:
    """Plan MODEL (a folder, a .gguf, a config.json or a shape such as llama3.1-8b) under the budgets."""
    import dataclasses

    from tierkv.bench.common import parse_contexts
    from tierkv.cli.common import parse_token_budget
    from tierkv.config import parse_size
    from tierkv.plan import PlanInputs, default_bandwidths, load_bandwidths, make_plan
    from tierkv.plan.budgets import parse_budgets
    from tierkv.plan.inputs import default_sparse_shape
    from tierkv.plan.report import format_plan
    from tierkv.plan.source import model_config_for

    gpu, cpu = parse_budgets(gpu_budget, cpu_budget, check=not any_machine)
    gpu_name, gpu = _machine_gpu(gpu, any_machine)
    cpu = cpu if cpu is not None else _default_cpu_budget(any_machine)
    contexts = parse_contexts(context)
    if len(contexts) != 1:
        raise ConfigError(f"--context {context!r} names {len(contexts)} lengths; give one, e.g. 131072 or 128K")
    cfg = model_config_for(model)
    sparse = default_sparse_shape(cfg)
    if prefill_chunk is not None:
        if prefill_chunk < 1:
            raise ConfigError(f"--prefill-chunk {prefill_chunk} must be at least 1")
        sparse = dataclasses.replace(sparse, prefill_chunk=prefill_chunk)
    measured = load_bandwidths(io_json, gpu_name) if io_json or not any_machine else default_bandwidths()
    bandwidths = measured.overridden(hbm=hbm_gbps, link=link_gbps, cpu=cpu_gbps,
                                                               disk=disk_gbps)
    asked = {"token_budget": parse_token_budget(token_budget), "budget_floor_tokens": budget_floor_tokens}
    extra = {k: v for k, v in asked.items() if v is not None}
    inputs = PlanInputs(cfg, contexts[0], gpu, cpu, parse_size(disk_budget, "disk_budget"),
                        dtype=dtype, attention=attention, sparse=sparse, bandwidths=bandwidths, **extra)
    plan = make_plan(inputs)
    click.echo(json.dumps(plan.to_json(), indent=1) if as_json else format_plan(plan))


def _machine_gpu(gpu: int | None, any_machine: bool) -> tuple[str | None, int]:
    """(this machine's GPU name or None, the GPU budget: as given, else the GPU's memory)."""
    import torch

    name = None
    if not any_machine and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name, total = props.name, props.total_memory
        return name, gpu if gpu is not None else total
    if gpu is None:
        raise ConfigError("no CUDA device here to take the GPU budget from; give --gpu-budget, e.g. 24GiB")
    return name, gpu


def _default_cpu_budget(any_machine: bool) -> int:
    import psutil

    if any_machine:
        raise ConfigError("--any-machine plans for another machine: give its --cpu-budget, e.g. 64GiB")
    return int(psutil.virtual_memory().available * DEFAULT_CPU_SHARE)
