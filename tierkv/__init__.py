"""tierkv: long-context LLM inference on one GPU with the KV cache spread over GPU, pinned CPU memory and NVMe."""

from tierkv.config import TierConfig
from tierkv.errors import TierKVError
from tierkv.llm import LLM, load

__all__ = ["load", "LLM", "TierConfig", "TierKVError"]
__version__ = "0.1.0"
