"""Running out of memory in prefill or a decode step becomes one DeviceMemoryError naming the setting to lower.

`guard_memory` wraps the LLM's and Chat's entry points (plain functions and generators). It catches CUDA's
out-of-memory error and the CPU allocator's, drops the traceback (its frames hold the failed call's tensors) and
empties torch's CUDA cache, so the same LLM can run again at once with a smaller budget or a shorter prompt.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Callable

import torch

from tierkv.config import TierConfig, format_size
from tierkv.errors import BudgetError

_CPU_ALLOC_FAILED = "can't allocate memory"  # torch's DefaultCPUAllocator message
# CUDA: "Tried to allocate 2.00 GiB."; the CPU allocator: "you tried to allocate 268435456 bytes."
_ASKED = re.compile(r"[Tt]ried to allocate ([\d.]+) ?(bytes|[KMGT]iB|)")


class DeviceMemoryError(BudgetError):
    """Prefill or a decode step ran out of GPU (or CPU) memory; the message names the budget to lower."""


def out_of_memory(error: BaseException) -> bool:
    """Whether error is an allocation failure (CUDA out of memory, the CPU allocator, Python's MemoryError)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and _CPU_ALLOC_FAILED in str(error)


def memory_message(error: BaseException, tier: TierConfig, device: torch.device) -> str:
    """One line: what ran out, how much was asked and in use, and the settings to lower (with their values now)."""
    m = _ASKED.search(str(error))
    asked = "" if m is None else f"; asked for {format_size(int(m[1])) if m[2] in ('', 'bytes') else m[1] + ' ' + m[2]}"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where = f"the GPU ({format_size(total - free)} of {format_size(total)} in use{asked})"
    else:
        where = f"the host (the compute device here{asked})"
    kv = format_size(tier.kv_gpu_budget) if tier.kv_gpu_budget is not None else "unset, so the whole KV cache is on it"
    return (f"out of memory on {where}; lower kv_gpu_budget (now {kv}) or prefill_chunk (now {tier.prefill_chunk}), "
            f"or shorten the prompt")


def guard_memory(tier_of: Callable[[object], TierConfig], device_of: Callable[[object], torch.device]):
    """Decorate a method (or generator method) so an allocation failure inside it raises DeviceMemoryError.

    tier_of/device_of take the method's `self` and return the settings and device the message names.
    """
    def wrap(fn):
        def translated(self, error: BaseException) -> DeviceMemoryError:
            msg = memory_message(error, tier_of(self), device_of(self))
            error.__traceback__ = None  # its frames hold the failed call's tensors: let them go now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return DeviceMemoryError(msg)

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(self, *args, **kwargs):
                err = None
                try:
                    yield from fn(self, *args, **kwargs)
                except (RuntimeError, MemoryError) as e:
                    if not out_of_memory(e):
                        raise
                    err = translated(self, e)
                if err is not None:
                    raise err  # raised outside the except block: no chained context keeps the frames alive
            return gen

        @functools.wraps(fn)
        def call(self, *args, **kwargs):
            err = None
            try:
                return fn(self, *args, **kwargs)
            except (RuntimeError, MemoryError) as e:
                if not out_of_memory(e):
                    raise
                err = translated(self, e)
            raise err
        return call
    return wrap
