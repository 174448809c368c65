"""ModelConfig: the frozen shape of a Llama-family model, read from a Hugging Face config.

Supported: Llama 2/3/3.1 (llama), Qwen2/2.5 (qwen2, QKV bias), Mistral (mistral), Qwen3 (qwen3, qk-norm) and
Gemma 3 text models (gemma3_text; the `gemma3` GGUF architecture reads as gemma3_text). Anything else is refused
with the architecture named. Per-layer facts (sliding window or full attention, the RoPE base of sliding layers)
and the architecture's options (tierkv/models/arch.py) live here, so the forward pass never asks for a model type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tierkv.errors import UnsupportedModelError
from tierkv.models.arch import LLAMA, Architecture, architecture_from_hf

SUPPORTED_TYPES = ("llama", "qwen2", "mistral", "qwen3", "gemma3_text")
_LAYER_TYPES = ("full_attention", "sliding_attention")


def unsupported_message(archs: str, model_type: object) -> str:
    """The one-line refusal for an architecture tierkv does not run."""
    return (f"architecture {archs!r} (model_type={model_type!r}) is not supported; tierkv runs "
            f"{', '.join(SUPPORTED_TYPES)} models (Llama, Qwen2, Mistral, Qwen3, Gemma 3 text)")


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
    # per layer: the sliding window in tokens (a query sees itself and the window - 1 keys before it), None for
    # full attention; () means full attention everywhere
    layer_windows: tuple[int | None, ...] = ()
    # RoPE of the sliding-window layers where it differs from the full-attention layers' (Gemma 3: base 10K)
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: dict[str, Any] = field(default_factory=dict)
    arch: Architecture = LLAMA
    name: str = ""

    @classmethod
    def from_hf(cls, hf: Any, name: str = "") -> "ModelConfig":
        """Build from a transformers PretrainedConfig (or anything with the same attributes)."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_TYPES:
            archs = ",".join(getattr(hf, "architectures", None) or []) or str(model_type)
            raise UnsupportedModelError(unsupported_message(archs, model_type))
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        theta, scaling = _rope_settings(hf, "full_attention")
        windows = _layer_windows(hf)
        local_theta, local_scaling = _rope_settings(hf, "sliding_attention")
        if not any(windows) or (local_theta, local_scaling) == (theta, scaling):
            local_theta, local_scaling = None, {}
        bias = model_type == "qwen2" or bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=float(hf.rms_norm_eps), rope_theta=theta,
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), attention_bias=bias,
            rope_scaling=scaling, layer_windows=windows if any(windows) else (), sliding_rope_theta=local_theta,
            sliding_rope_scaling=local_scaling, arch=architecture_from_hf(hf, model_type), name=name,
        )

    def window(self, layer: int) -> int | None:
        """Layer's sliding window in tokens, or None where it attends to everything before it."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def has_windows(self) -> bool:
        """Whether any layer attends through a sliding window."""
        return any(w is not None for w in self.layer_windows)

    def sliding_rope_config(self) -> "ModelConfig":
        """This config with the sliding layers' RoPE as its own (for building their cos/sin table)."""
        if self.sliding_rope_theta is None:
            return self
        return replace(self, rope_theta=self.sliding_rope_theta, rope_scaling=dict(self.sliding_rope_scaling))

    def binding_window(self, layer: int) -> int | None:
        """Layer's window where it is shorter than the context (a longer one never drops a key), else None: what
        the caches keep per layer (a ring of the window, or every position)."""
        w = self.window(layer)
        return w if w is not None and w < self.max_position_embeddings else None

    @property
    def full_attention_layers(self) -> int:
        """Layers that keep every earlier token (the rest keep only their window)."""
        return sum(self.binding_window(i) is None for i in range(self.num_layers))

    @property
    def kv_bytes_per_token(self) -> int:
        """K+V bytes one more token adds, at 2 bytes per element: the full-attention layers' only (a sliding-window
        layer keeps a fixed window, tierkv/kv/caches/window_ring.py)."""
        return self.full_attention_layers * self.num_kv_heads * self.head_dim * 2 * 2


def _layer_windows(hf: Any) -> tuple[int | None, ...]:
    """Each layer's window as transformers applies it: `layer_types` where the config has them (Qwen2/Qwen3 derive
    them from use_sliding_window and max_window_layers, Gemma 3 from its pattern), else `sliding_window` on every
    layer (Mistral)."""
    n = hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    if types is None:
        return (window,) * n
    bad = sorted(set(types) - set(_LAYER_TYPES))
    if bad or len(types) != n:
        raise UnsupportedModelError(f"layer_types {bad or types!r} are not supported; tierkv runs "
                                    f"{' and '.join(_LAYER_TYPES)} layers, one entry per layer")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _rope_settings(hf: Any, layer_type: str) -> tuple[float, dict[str, Any]]:
    """(theta, scaling dict without the theta) of one layer type, from transformers 5 `rope_parameters` (flat, or
    keyed by layer type as Gemma 3's) or older keys."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if layer_type in params:
        params = dict(params[layer_type])
    legacy = getattr(hf, "rope_scaling", None) or {}
    if not params:
        params = dict(legacy)
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    theta = float(params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    params.pop("type", None)
    return theta, params
