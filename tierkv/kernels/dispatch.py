"""Chooses, once per device, whether kernels run as Triton or as their torch reference.

Triton is used on CUDA devices when `triton` imports; everything else runs the torch reference.
`impl="torch"|"triton"` forces a choice; `implementation(device)` names the choice for stats and `tierkv info`.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from tierkv.errors import ConfigError

IMPLS = ("torch", "triton")

# The only module state: device -> chosen implementation, filled on first use.
_CHOICE: dict[tuple[str, int | None], str] = {}


def triton_version() -> str | None:
    """Version of the importable `triton` package, or None when it is absent or broken."""
    try:
        triton = importlib.import_module("triton")
    except Exception:  # an ImportError or a broken install both mean "no Triton": named, not silent
        return None
    return str(getattr(triton, "__version__", "unknown"))


def _key(device: torch.device | str) -> tuple[str, int | None]:
    dev = torch.device(device)
    index = dev.index
    if dev.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return dev.type, index


def resolve(device: torch.device | str, impl: str | None = None) -> str:
    """Return "torch" or "triton" for `device`; `impl` forces one. Decided once per device, then cached."""
    if impl is not None:
        if impl not in IMPLS:
            raise ConfigError(f"kernel impl={impl!r} is unknown; use one of {IMPLS} or leave it unset")
        if impl == "triton" and triton_version() is None:
            raise ConfigError("kernel impl='triton' was forced but triton does not import; install triton or use impl='torch'")
        return impl
    key = _key(device)
    if key not in _CHOICE:
        _CHOICE[key] = "triton" if key[0] == "cuda" and triton_version() is not None else "torch"
    return _CHOICE[key]


def implementation(device: torch.device | str, impl: str | None = None) -> str:
    """Human-readable name of the kernels used on `device`: "torch" or "triton-3.6.0"."""
    choice = resolve(device, impl)
    return f"triton-{triton_version()}" if choice == "triton" else "torch"


def get(op: str, device: torch.device | str, impl: str | None = None, *, module: str | None = None) -> Callable:
    """The function `<op>_torch` (from tierkv.kernels.<module>) or `<op>_triton` (from <module>_triton).

    `module` defaults to `op`; Triton modules are imported only here, so the CPU path never needs triton.
    """
    choice = resolve(device, impl)
    name = f"tierkv.kernels.{module or op}" + ("_triton" if choice == "triton" else "")
    module = importlib.import_module(name)
    return getattr(module, f"{op}_{choice}")


def reset() -> None:
    """Forget cached choices (tests only)."""
    _CHOICE.clear()
