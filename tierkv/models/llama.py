"""Our Llama-family forward pass (Llama 2/3/3.1, Qwen2/2.5, Mistral, Qwen3, Gemma 3 text), batch size 1.

RMSNorm, RoPE, grouped-query attention through an explicit KVCache, a gated MLP. Q/K/V and gate/up
projections are fused into one matrix each at load time so a decode step launches fewer kernels. What an
architecture does differently (qk-norm, sandwich norms, GeGLU, embedding and query scales) comes from
`cfg.arch` (tierkv/models/arch.py); which layers slide a window and which RoPE table each uses, from `cfg`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierkv.kernels import dispatch
from tierkv.kv.caches.base import KVCache
from tierkv.models.config import ModelConfig
from tierkv.models.rope import Rope
from tierkv.weights.linear import linear


@dataclass
class LayerWeights:
    """One decoder layer's tensors, Hugging Face projections fused: qkv = [q; k; v], gate_up = [gate; up].

    Norm weights are as the forward multiplies them (Gemma's 1 + weight already added at load).
    """

    input_norm: torch.Tensor  # (hidden,) before attention
    qkv_proj: torch.Tensor  # ((Hq + 2 Hkv) D, hidden)
    qkv_bias: torch.Tensor | None  # ((Hq + 2 Hkv) D,)
    o_proj: torch.Tensor  # (hidden, Hq D)
    pre_mlp_norm: torch.Tensor  # (hidden,) HF Llama's post_attention_layernorm, Gemma's pre_feedforward_layernorm
    gate_up_proj: torch.Tensor  # (2 I, hidden)
    down_proj: torch.Tensor  # (hidden, I)
    q_norm: torch.Tensor | None = None  # (D,) per query head before RoPE (qk-norm)
    k_norm: torch.Tensor | None = None  # (D,) per key head before RoPE
    attn_out_norm: torch.Tensor | None = None  # (hidden,) on the attention output (Gemma's post_attention_layernorm)
    mlp_out_norm: torch.Tensor | None = None  # (hidden,) on the MLP output (Gemma's post_feedforward_layernorm)


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU's activation: gelu(gate, tanh approximation) * up from the fused gate/up projection (T, 2I) -> (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


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
        self.weights = None  # a tierkv.weights.store.LayerStore when some layers are not resident (attach_weights)
        length = min(cfg.max_position_embeddings, 4096)
        # `rope` is the full-attention layers' table (the sparse caches rebuild key shadows with it); sliding
        # layers use their own where the config gives them another base (Gemma 3: 10K against 1M)
        self.sliding_rope = None
        if cfg.sliding_rope_theta is not None:
            self.sliding_rope = Rope(cfg.sliding_rope_config(), self.device, self.dtype, length=length)
        self.rope = Rope(cfg, self.device, self.dtype, length=length,
                         companions=(self.sliding_rope,) if self.sliding_rope else ())
        self.layer_rope = [self.sliding_rope if self.sliding_rope and cfg.window(i) is not None else self.rope
                           for i in range(cfg.num_layers)]
        a = cfg.arch
        # transformers multiplies by the scale rounded to the compute dtype (a 0-d tensor, no host sync)
        self.embed_scale = None if a.embed_scale is None else torch.tensor(a.embed_scale, dtype=self.dtype,
                                                                           device=self.device)
        # SDPA and the decode kernels scale scores by D**-0.5; a config's own scale is folded into q
        self.q_scale = 1.0 if a.query_scale is None else a.query_scale * math.sqrt(cfg.head_dim)
        # fused kernels (Triton on CUDA, torch references elsewhere), chosen once for this device
        self._norm = dispatch.get("add_rms_norm", self.device, module="norm")
        self._rope = dispatch.get("qk_rope", self.device)
        self._act = dispatch.get("silu_mul", self.device) if a.activation == "silu" else gelu_tanh_mul

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, *,
                last_only: bool = False) -> torch.Tensor:
        """ids (T,) and positions (T,) on the device -> logits (T or 1, vocab) in float32."""
        h, x = self._embed(ids)
        predict = ids.shape[0] == 1 and cache.prefetches_picks  # kv/interface.PickPrefetchHooks
        self._begin_pass()
        for i in range(len(self.layers)):
            w = self.fetch_layer(i)
            h, x = self._layer(i, h, x, positions, cache, predict, w)
            self.release_layer(i)
        cache.advance(ids.shape[0])
        if last_only:
            x = x[-1:]
        logits = F.linear(x, self.lm_head).float()  # (T, vocab)
        self._end_pass()  # after lm_head, so the next token's first weight copy overlaps it
        return logits

    def forward_by_layer(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slice_len: int,
                         on_layer=None) -> torch.Tensor:
        """Prefill layer after layer: each layer runs every slice of slice_len tokens before the next layer starts,
        so a cache that took `begin_layer_prefill` keeps one layer's K/V for the whole prompt on the device. The
        slices' arithmetic is forward()'s, so the logits equal a slice-after-slice prefill's. ids, positions (T,)
        -> logits of the last token (1, vocab) fp32. Holds the residual stream of all T tokens (T hidden values):
        each slice's normed input is recomputed from it, equal to the fused norm's output since both normalise the
        rounded residual, so the prompt's normed inputs (T hidden values more) never stay on the device.
        on_layer(i) is called after each layer (progress)."""
        n = ids.shape[0]
        h = self._embedded(ids)  # (T, hidden)
        self._begin_pass()
        for i in range(len(self.layers)):
            w = self.fetch_layer(i)  # once per layer: a streamed layer is copied once for the whole prompt
            if cache.attends_whole_layer(i):
                self._layer_whole(i, h, positions, cache, slice_len, w)
            else:
                for s in range(0, n, slice_len):
                    e = min(n, s + slice_len)
                    h[s:e] = self._layer(i, h[s:e], self._input_norm(i, h[s:e]), positions[s:e], cache, False, w)[0]
            self.release_layer(i)
            if on_layer is not None:
                on_layer(i)
        cache.advance(n)
        logits = F.linear(self._norm(h[-1:], None, self.norm, self.cfg.rms_norm_eps)[1], self.lm_head).float()
        self._end_pass()
        return logits

    # --- where each layer's weights come from (tierkv/weights/store.py when some are not resident) -----------
    def attach_weights(self, store) -> None:
        """Take layer weights from `store` (a LayerStore): streamed layers are fetched into device slots, CPU
        layers compute where their weights are."""
        self.weights = store

    def fetch_layer(self, i: int) -> LayerWeights:
        """Layer i's weights, ready for work queued after this call (a streamed layer: in its slot)."""
        return self.layers[i] if self.weights is None else self.weights.fetch(i)

    def release_layer(self, i: int) -> None:
        """Work queued so far is the last use of layer i's weights in this pass."""
        if self.weights is not None:
            self.weights.release(i)

    def resident(self, i: int) -> bool:
        """Whether layer i's weights are always on the device (not streamed, not on the CPU)."""
        return self.weights is None or self.weights.resident(i)

    def _begin_pass(self) -> None:
        if self.weights is not None:
            self.weights.begin_pass()

    def _end_pass(self) -> None:
        if self.weights is not None:
            self.weights.end_pass()

    def _layer_whole(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, slice_len: int,
                     w: LayerWeights) -> None:
        """Layer i (weights w) over the whole prompt with one attention call: every slice's projections are
        appended and its queries kept, the cache attends them all at once (`attend_layer`), then each slice runs
        the rest of the layer. Updates the residual h (T, hidden) in place."""
        c, n = self.cfg, h.shape[0]
        q_all = torch.empty(n, c.num_heads, c.head_dim, device=h.device, dtype=h.dtype)
        for s in range(0, n, slice_len):
            e = min(n, s + slice_len)
            q, k, k_pre, v = self._qkv(i, w, self._input_norm(i, h[s:e]), positions[s:e])
            cache.append(i, k, v, k_pre)
            q_all[s:e] = q
        out = cache.attend_layer(i, q_all)  # (T, Hq, D)
        del q_all
        for s in range(0, n, slice_len):
            e = min(n, s + slice_len)
            attn = linear(out[s:e].reshape(e - s, c.num_heads * c.head_dim), w.o_proj)
            h[s:e] = self._after_attention(i, h[s:e], attn, positions[s:e], cache, False, w)[0]

    def layer_prefill_bytes(self, n: int) -> int:
        """Device bytes forward_by_layer needs for n tokens beyond the cache's: the residual stream and, with
        whole-layer attention, the layer's queries and attention output."""
        c = self.cfg
        return n * (c.hidden_size + 2 * c.num_heads * c.head_dim) * self.dtype.itemsize

    def _embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, first layer's normed input) of ids, each (T, hidden)."""
        return self._norm(self._embedded(ids), None, self.layers[0].input_norm, self.cfg.rms_norm_eps)

    def _embedded(self, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's start: ids' embeddings (T, hidden), scaled where the architecture scales them."""
        emb = self.embed_tokens[ids]  # (T, hidden)
        return emb if self.embed_scale is None else emb * self.embed_scale

    def _input_norm(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's normed input from the residual h, as the previous layer's fused norm gave it."""
        return self._norm(h, None, self.layers[i].input_norm, self.cfg.rms_norm_eps)[1]

    def _layer(self, i: int, h: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               predict: bool, w: LayerWeights | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer i on residual h and its normed input x -> (residual, next layer's normed input).
        w: layer i's weights as fetch_layer gave them (default: the resident ones)."""
        w = self.layers[i] if w is None else w
        attn = self._attention(i, w, x, positions, cache)
        return self._after_attention(i, h, attn, positions, cache, predict, w)

    def _after_attention(self, i: int, h: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor,
                         cache: KVCache, predict: bool, layer: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i after its attention (attn: the o_proj output), with its weights `layer`: sandwich norm,
        residual, MLP -> (residual, next layer's normed input)."""
        eps = self.cfg.rms_norm_eps
        attn = self._out_norm(attn, layer.attn_out_norm)
        h, x = self._norm(h, attn, layer.pre_mlp_norm, eps)
        # the cache may prefetch layer i+1's picks during this MLP (from its resident weights only)
        if predict and i + 1 < len(self.layers) and self.resident(i + 1):
            cache.predicted_query(i + 1, lambda j=i + 1, r=h: self._predicted_query(j, r, positions))
        nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
        return self._norm(h, self._out_norm(self._mlp(layer, x), layer.mlp_out_norm), nxt, eps)

    def _out_norm(self, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Sandwich norm on a sub-block's output (identity where the architecture has none)."""
        return y if weight is None else self._norm(y, None, weight, self.cfg.rms_norm_eps)[1]

    def _qkv(self, i: int, w: LayerWeights, x: torch.Tensor,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's q (T, Hq, D) rotated and scaled, k (T, Hkv, D) rotated, pre-RoPE k and v (T, Hkv, D)."""
        c = self.cfg
        t = x.shape[0]
        qkv = linear(x, w.qkv_proj, w.qkv_bias)  # (T, (Hq + 2 Hkv) D)
        if w.q_norm is not None:
            qkv = self._qk_norm(qkv, w)
        rope = self.layer_rope[i]
        q, k, k_pre = self._rope(qkv, rope.cos, rope.sin, positions, c.num_heads, c.num_kv_heads)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        v = qkv[:, (c.num_heads + c.num_kv_heads) * c.head_dim:].view(t, c.num_kv_heads, c.head_dim)  # (T, Hkv, D)
        return q, k, k_pre, v

    def _qk_norm(self, qkv: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """RMSNorm over each query and key head of the fused projection; v passes through."""
        c, t, d = self.cfg, qkv.shape[0], self.cfg.head_dim
        q, k, v = qkv.split([c.num_heads * d, c.num_kv_heads * d, c.num_kv_heads * d], dim=-1)
        _, q = self._norm(q.reshape(-1, d), None, w.q_norm, c.rms_norm_eps)  # (T Hq, D)
        _, k = self._norm(k.reshape(-1, d), None, w.k_norm, c.rms_norm_eps)  # (T Hkv, D)
        return torch.cat([q.view(t, -1), k.view(t, -1), v], dim=-1)

    def _attention(self, i: int, w: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        c = self.cfg
        q, k, k_pre, v = self._qkv(i, w, x, positions)
        cache.append(i, k, v, k_pre)
        out = cache.attend(i, q)  # (T, Hq, D)
        return linear(out.reshape(x.shape[0], c.num_heads * c.head_dim), w.o_proj)

    def _predicted_query(self, i: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer i's query as if its input were residual h (the residual before layer i-1's MLP): (1, Hq, D)."""
        w = self.layers[i]
        _, x = self._norm(h, None, w.input_norm, self.cfg.rms_norm_eps)
        return self._qkv(i, w, x, positions)[0]

    def _mlp(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return linear(self._act(linear(x, w.gate_up_proj)), w.down_proj)
