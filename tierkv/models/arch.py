"""What one architecture does differently from Llama, as a frozen set of options read from a HF config.

The forward pass (tierkv/models/llama.py) and the weight loader (tierkv/models/build.py) read these options;
nothing else branches on `model_type`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tierkv.errors import UnsupportedModelError

ACTIVATIONS = ("silu", "gelu_tanh")
# HF `hidden_act` / `hidden_activation` names -> ours
_ACT_NAMES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class Architecture:
    """Per-architecture forward-pass options; the defaults are Llama's.

    qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3).
    sandwich_norms: an extra RMSNorm on the attention output and on the MLP output before each residual add,
        and a separate pre-MLP norm (Gemma 3: pre/post attention and pre/post feedforward norms).
    norm_weight_offset: added to every RMSNorm weight at load time (Gemma scales by 1 + weight).
    activation: the gated MLP's activation ("silu": SwiGLU, "gelu_tanh": GeGLU with the tanh approximation).
    embed_scale: the embedding rows are multiplied by this, rounded to the compute dtype (Gemma: sqrt(hidden)).
    query_scale: attention's score scale (None: head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5).
    """

    qk_norm: bool = False
    sandwich_norms: bool = False
    norm_weight_offset: float = 0.0
    activation: str = "silu"
    embed_scale: float | None = None
    query_scale: float | None = None


LLAMA = Architecture()


def architecture_from_hf(hf: Any, model_type: str) -> Architecture:
    """The options of a supported `model_type`; refuses settings our forward pass does not implement."""
    act_name = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
    activation = _ACT_NAMES.get(act_name)
    if model_type == "qwen3":
        arch = Architecture(qk_norm=True, activation=activation or "")
    elif model_type == "gemma3_text":
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(hf, name, None) is not None:
                raise UnsupportedModelError(f"{name}={getattr(hf, name)!r} is not supported; tierkv runs Gemma 3 "
                                            "configs without logit soft-capping")
        if getattr(hf, "use_bidirectional_attention", False):
            raise UnsupportedModelError("use_bidirectional_attention=True is not supported; tierkv runs causal "
                                        "Gemma 3 text models")
        arch = Architecture(qk_norm=True, sandwich_norms=True, norm_weight_offset=1.0, activation=activation or "",
                            embed_scale=math.sqrt(hf.hidden_size),
                            query_scale=float(hf.query_pre_attn_scalar) ** -0.5)
    else:
        arch = Architecture(activation=activation or "")
    if arch.activation not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {act_name!r} is not supported for {model_type}; tierkv implements "
                                    "SwiGLU (silu) and GeGLU (gelu_pytorch_tanh)")
    return arch
