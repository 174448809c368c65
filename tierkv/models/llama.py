"""Our Llama-family forward pass (Llama 2/3/3.1, Qwen2/2.5, Mistral), batch size 1.

RMSNorm, RoPE, grouped-query attention through an explicit KVCache, SwiGLU. Q/K/V and gate/up
projections are fused into one matrix each at load time so a decode step launches fewer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierkv.kernels import dispatch
from tierkv.kv.cache import KVCache
from tierkv.models.config import ModelConfig
from tierkv.models.rope import Rope


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
        # fused kernels (Triton on CUDA, torch references elsewhere), chosen once for this device
        self._norm = dispatch.get("add_rms_norm", self.device, module="norm")
        self._rope = dispatch.get("qk_rope", self.device)
        self._silu_mul = dispatch.get("silu_mul", self.device)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, *,
                last_only: bool = False) -> torch.Tensor:
        """ids (T,) and positions (T,) on the device -> logits (T or 1, vocab) in float32."""
        c = self.cfg
        h, x = self._norm(self.embed_tokens[ids], None, self.layers[0].input_layernorm, c.rms_norm_eps)  # (T, hidden)
        predict = ids.shape[0] == 1 and cache.prefetches_picks  # kv/interface.PickPrefetchHooks
        for i, layer in enumerate(self.layers):
            h, x = self._norm(h, self._attention(i, layer, x, positions, cache), layer.post_attention_layernorm,
                              c.rms_norm_eps)
            if predict and i + 1 < len(self.layers):  # the cache may prefetch layer i+1's picks during this MLP
                cache.predicted_query(i + 1, lambda j=i + 1, r=h: self._predicted_query(j, r, positions))
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, x = self._norm(h, self._mlp(layer, x), nxt, c.rms_norm_eps)
        cache.advance(ids.shape[0])
        if last_only:
            x = x[-1:]
        return F.linear(x, self.lm_head).float()  # (T, vocab)

    def _attention(self, i: int, w: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        c = self.cfg
        t = x.shape[0]
        qkv = F.linear(x, w.qkv_proj, w.qkv_bias)  # (T, (Hq + 2 Hkv) D)
        q, k, k_pre = self._rope(qkv, self.rope.cos, self.rope.sin, positions, c.num_heads, c.num_kv_heads)
        v = qkv[:, (c.num_heads + c.num_kv_heads) * c.head_dim:].view(t, c.num_kv_heads, c.head_dim)  # (T, Hkv, D)
        cache.append(i, k, v, k_pre)
        out = cache.attend(i, q)  # (T, Hq, D)
        return F.linear(out.reshape(t, c.num_heads * c.head_dim), w.o_proj)

    def _predicted_query(self, i: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer i's query as if its input were residual h (the residual before layer i-1's MLP): (1, Hq, D)."""
        c, w = self.cfg, self.layers[i]
        _, x = self._norm(h, None, w.input_layernorm, c.rms_norm_eps)
        q, _, _ = self._rope(F.linear(x, w.qkv_proj, w.qkv_bias), self.rope.cos, self.rope.sin, positions,
                             c.num_heads, c.num_kv_heads)
        return q

    def _mlp(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._silu_mul(F.linear(x, w.gate_up_proj)), w.down_proj)
