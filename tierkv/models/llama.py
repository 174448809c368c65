"""Our Llama-family forward pass (Llama 2/3/3.1, Qwen2/2.5, Mistral), batch size 1.

RMSNorm, RoPE, grouped-query attention through an explicit KVCache, SwiGLU. Q/K/V and gate/up
projections are fused into one matrix each at load time so a decode step launches fewer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierkv.kv.cache import KVCache
from tierkv.models.config import ModelConfig
from tierkv.models.rope import Rope, apply_rope


@dataclass
class LayerWeights:
    """One decoder layer's tensors, Hugging Face projections fused: qkv = [q; k; v], gate_up = [gate; up]."""

    input_layernorm: torch.Tensor  # (hidden,)
    qkv_proj: torch.Tensor  # ((Hq + 2 Hkv) D, hidden)
    qkv_bias: torch.Tensor | None  # ((Hq + 2 Hkv) D,)
    o_proj: torch.Tensor  # (hidden, Hq D)
    post_attention_layernorm: torch.Tensor  # (hidden,)
    gate_up_proj: torch.Tensor  # (2 I, hidden)
    down_proj: torch.Tensor  # (hidden, I)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the reference implementations do."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    """The forward pass over weights already on the compute device.

    `forward(ids, positions, cache)` appends the new tokens' K/V to `cache` (mutates it) and returns
    logits for every new token, or for the last one only.
    """

    def __init__(self, cfg: ModelConfig, embed_tokens: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        self.cfg = cfg
        self.embed_tokens, self.layers, self.norm, self.lm_head = embed_tokens, layers, norm, lm_head
        self.device, self.dtype = embed_tokens.device, embed_tokens.dtype
        self.rope = Rope(cfg, self.device, self.dtype, length=min(cfg.max_position_embeddings, 4096))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, *,
                last_only: bool = False) -> torch.Tensor:
        """ids (T,) and positions (T,) on the device -> logits (T or 1, vocab) in float32."""
        cos, sin = self.rope.tables(positions)  # (T, 1, D)
        h = self.embed_tokens[ids]  # (T, hidden)
        for i, layer in enumerate(self.layers):
            h = h + self._attention(i, layer, rms_norm(h, layer.input_layernorm, self.cfg.rms_norm_eps), cos, sin, cache)
            h = h + self._mlp(layer, rms_norm(h, layer.post_attention_layernorm, self.cfg.rms_norm_eps))
        cache.advance(ids.shape[0])
        if last_only:
            h = h[-1:]
        h = rms_norm(h, self.norm, self.cfg.rms_norm_eps)
        return F.linear(h, self.lm_head).float()  # (T, vocab)

    def _attention(self, i: int, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        c = self.cfg
        t, d = x.shape[0], c.head_dim
        qkv = F.linear(x, w.qkv_proj, w.qkv_bias)  # (T, (Hq + 2 Hkv) D)
        q, k, v = qkv.split([c.num_heads * d, c.num_kv_heads * d, c.num_kv_heads * d], dim=-1)
        q = q.view(t, c.num_heads, d)  # (T, Hq, D)
        k_pre = k.view(t, c.num_kv_heads, d)  # (T, Hkv, D), before RoPE: what shadows compress
        v = v.view(t, c.num_kv_heads, d)  # (T, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k_pre, cos, sin)
        cache.append(i, k, v, k_pre)
        out = cache.attend(i, q)  # (T, Hq, D)
        return F.linear(out.reshape(t, c.num_heads * d), w.o_proj)

    @staticmethod
    def _mlp(w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w.gate_up_proj).chunk(2, dim=-1)  # (T, I) each
        return F.linear(F.silu(gate) * up, w.down_proj)
