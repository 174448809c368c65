"""tierkv: long-context LLM inference on one GPU with the KV cache spread over GPU, pinned CPU memory and NVMe."""

from tierkv.config import TierConfig
from tierkv.errors import TierKVError
from tierkv.llm import LLM, load
from tierkv.chat import Chat  # noqa: E402 - after llm, which it builds on

__all__ = ["load", "LLM", "Chat", "TierConfig", "TierKVError"]
__version__ = "0.1.0"
