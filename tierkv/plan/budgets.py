"""Budget strings from the user, parsed and checked against this machine: a GPU budget above the device's memory
(when a CUDA device is visible) or a CPU budget above the memory available now is refused with one line."""

from __future__ import annotations

from tierkv.config import format_size, parse_size
from tierkv.errors import BudgetError


def check_gpu_budget(nbytes: int, name: str = "gpu_budget") -> None:
    """Raise BudgetError when nbytes exceeds the total memory of CUDA device 0; no check without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return
    props = torch.cuda.get_device_properties(0)
    if nbytes > props.total_memory:
        raise BudgetError(f"{name}={format_size(nbytes)} is more than the {format_size(props.total_memory)} of "
                          f"{props.name}; lower {name} to at most {format_size(props.total_memory)}")


def check_cpu_budget(nbytes: int, name: str = "cpu_budget") -> None:
    """Raise BudgetError when nbytes exceeds the host memory available right now (psutil)."""
    from tierkv.kv.storage.host import check_host_budget

    check_host_budget(nbytes, name)


def parse_budgets(gpu: str | None, cpu: str | None, *, check: bool = True) -> tuple[int | None, int | None]:
    """(gpu_budget, cpu_budget) in bytes from strings such as '24GiB' (None stays None); with check, each is
    compared with this machine's memory."""
    gpu_bytes, cpu_bytes = parse_size(gpu, "gpu_budget"), parse_size(cpu, "cpu_budget")
    if check and gpu_bytes is not None:
        check_gpu_budget(gpu_bytes)
    if check and cpu_bytes is not None:
        check_cpu_budget(cpu_bytes)
    return gpu_bytes, cpu_bytes
