"""Built-in model shapes for benchmarks with random weights, where real weights cannot be downloaded."""

from __future__ import annotations

import math

from tierkv.errors import ModelNotFoundError
from tierkv.models.arch import Architecture
from tierkv.models.config import ModelConfig

_DEFAULT_ROPE = {"rope_type": "default"}
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

SHAPES: dict[str, ModelConfig] = {
    "llama3.1-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, 131072, False,
                               rope_scaling=_LLAMA31_ROPE, name="llama3.1-8b"),
    "llama3.2-1b": ModelConfig("llama", 128256, 2048, 8192, 16, 32, 8, 64, 1e-5, 500000.0, 131072, True,
                               rope_scaling={**_LLAMA31_ROPE, "factor": 32.0}, name="llama3.2-1b"),
    "qwen2.5-7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 1e-6, 1000000.0, 131072, False,
                              attention_bias=True, rope_scaling={"rope_type": "default"}, name="qwen2.5-7b"),
    "qwen2.5-32b": ModelConfig("qwen2", 152064, 5120, 27648, 64, 40, 8, 128, 1e-5, 1000000.0, 131072, False,
                               attention_bias=True, rope_scaling={"rope_type": "default"}, name="qwen2.5-32b"),
    # Gemma 3 270M as its GGUF reads (tests/models/test_gemma3.py checks it against the real file): 5 sliding-window
    # layers (512 tokens, RoPE base 10K) to each full-attention layer (base 1M), 1 KV head of 256
    "gemma3-270m": ModelConfig("gemma3_text", 262144, 640, 2048, 18, 4, 1, 256, 9.999999974752427e-07, 1000000.0,
                               32768, True, rope_scaling=_DEFAULT_ROPE, layer_windows=(512,) * 5 + (None,) + (512,) * 5
                               + (None,) + (512,) * 5 + (None,), sliding_rope_theta=10000.0,
                               sliding_rope_scaling=_DEFAULT_ROPE,
                               arch=Architecture(qk_norm=True, sandwich_norms=True, norm_weight_offset=1.0,
                                                 activation="gelu_tanh", embed_scale=math.sqrt(640),
                                                 query_scale=256 ** -0.5),
                               name="gemma3-270m"),
    "llama-tiny": ModelConfig("llama", 512, 64, 128, 2, 4, 2, 16, 1e-5, 10000.0, 1 << 20, False,
                              rope_scaling={"rope_type": "default"}, name="llama-tiny"),
}


def shape_config(name: str) -> ModelConfig:
    """The ModelConfig of a built-in shape; unknown names list the known ones."""
    if name not in SHAPES:
        raise ModelNotFoundError(f"unknown model shape {name!r}; built-in shapes are {', '.join(SHAPES)}")
    return SHAPES[name]
