"""tierkv: long-context LLM inference on one GPU with the KV cache spread over GPU, pinned CPU memory and NVMe.

The public names load lazily (PEP 562 module __getattr__), so `tierkv --help` does not import torch.
"""

from __future__ import annotations

import importlib

from tierkv.errors import TierKVError

__all__ = ["load", "LLM", "Chat", "TierConfig", "SamplingConfig", "TierKVError"]
__version__ = "0.1.0"

_LAZY = {"load": "tierkv.llm", "LLM": "tierkv.llm", "Chat": "tierkv.chat", "TierConfig": "tierkv.config",
         "SamplingConfig": "tierkv.sample_config"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tierkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
