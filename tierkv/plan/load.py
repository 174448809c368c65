"""The plan `tierkv.load(gpu_budget=...)` runs before any weight loads: budgets parsed and checked against this
machine, the planner asked, and what the loader takes from its answer (placement, kv_gpu_budget, attention).

On a CPU device the "GPU" is the compute device's share of host memory: gpu_budget is checked against the
machine's total memory and the plan splits it as it would a GPU's, so the offload paths run on the CPU too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace

import torch

from tierkv.config import format_size, parse_size
from tierkv.errors import BudgetError
from tierkv.models.config import ModelConfig
from tierkv.plan.bandwidth import load_bandwidths
from tierkv.plan.budgets import check_cpu_budget, check_gpu_budget
from tierkv.plan.inputs import PlanInputs
from tierkv.plan.planner import make_plan
from tierkv.plan.result import Plan

DEFAULT_CPU_SHARE = 0.8  # of the memory available now, when no cpu_budget is given
DISK_SHARE = 0.9  # of the free space of disk_dir the plan may use
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class LoadPlan:
    plan: Plan
    placement: tuple[str, ...]
    kv_gpu_budget: int  # the plan's GPU bytes for the KV cache: its fixed parts and the pool


def check_device_budget(nbytes: int, device: torch.device) -> None:
    """gpu_budget against the compute device's memory (a CPU device: the machine's total memory)."""
    if device.type == "cuda":
        check_gpu_budget(nbytes)
        return
    import psutil

    total = psutil.virtual_memory().total
    if nbytes > total:
        raise BudgetError(f"gpu_budget={format_size(nbytes)} is more than the {format_size(total)} of memory of "
                          f"this CPU device; lower gpu_budget to at most {format_size(total)}")


def plan_for_load(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, context: int, gpu_budget,
                  cpu_budget=None, disk_dir: str | None = None, attention: str | None = None,
                  token_budget: int | float | None = None) -> LoadPlan:
    """The plan for loading cfg under the budgets (strings like '12GiB' or bytes); BudgetError for a budget
    that does not parse (ConfigError), exceeds this machine, or cannot hold the model (PlanDoesNotFitError)."""
    import psutil

    gpu = parse_size(gpu_budget, "gpu_budget")
    cpu = parse_size(cpu_budget, "cpu_budget")
    check_device_budget(gpu, device)
    if cpu is None:
        cpu = int(psutil.virtual_memory().available * DEFAULT_CPU_SHARE)
    else:
        check_cpu_budget(cpu)
    disk = int(shutil.disk_usage(disk_dir).free * DISK_SHARE) if disk_dir else 0
    gpu_name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else None
    extra = {} if token_budget is None else {"token_budget": token_budget}
    inputs = PlanInputs(cfg, context, gpu, cpu, disk, dtype=DTYPE_NAMES[dtype], attention=attention,
                        bandwidths=load_bandwidths(None, gpu_name), **extra)
    plan = make_plan(inputs)
    if plan.embedding == "host":
        # the runtime keeps the embedding on the device (a host gather would sync in the captured step): plan the
        # rest in what the embedding leaves
        emb = cfg.vocab_size * cfg.hidden_size * inputs.elem_bytes
        if gpu - emb <= 0:
            raise BudgetError(f"gpu_budget={format_size(gpu)} cannot hold the {format_size(emb)} embedding; "
                              f"raise gpu_budget")
        plan = make_plan(replace(inputs, gpu_budget=gpu - emb))
        plan = replace(plan, reasons=(f"embedding ({format_size(emb)}) kept on the device by the runtime: the "
                                      f"layers were planned in gpu_budget - embedding", *plan.reasons))
    return LoadPlan(plan, plan.layers, plan.gpu["kv_fixed"] + plan.gpu["kv_pool"])
