"""ModelConfig: the frozen shape of a Llama-family model, read from a Hugging Face config.

Supported: Llama 2/3/3.1 (llama), Qwen2/2.5 (qwen2, QKV bias), Mistral (mistral). Anything else
is refused with the architecture named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tierkv.errors import UnsupportedModelError

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of one model; batch size is always 1."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    sliding_window: int | None = None
    name: str = ""

    @classmethod
    def from_hf(cls, hf: Any, name: str = "") -> "ModelConfig":
        """Build from a transformers PretrainedConfig (or anything with the same attributes)."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_TYPES:
            archs = ",".join(getattr(hf, "architectures", None) or []) or str(model_type)
            raise UnsupportedModelError(
                f"architecture {archs!r} (model_type={model_type!r}) is not supported; "
                f"tierkv runs {', '.join(SUPPORTED_TYPES)} models")
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        theta, scaling = _rope_settings(hf)
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={hf.hidden_act!r} is not supported; tierkv implements SwiGLU (silu)")
        bias = model_type == "qwen2" or bool(getattr(hf, "attention_bias", False))
        window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
        return cls(
            model_type=model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=float(hf.rms_norm_eps), rope_theta=theta,
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), attention_bias=bias,
            rope_scaling=scaling, sliding_window=window, name=name,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """K+V bytes per token over all layers at 2 bytes per element."""
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * 2


def _rope_settings(hf: Any) -> tuple[float, dict[str, Any]]:
    """(theta, scaling dict without the theta) from transformers 5 `rope_parameters` or older keys."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None) or {}
    if not params:
        params = dict(legacy)
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    theta = float(params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    params.pop("type", None)
    return theta, params
