"""Byte counts the planner works from: weights per layer, KV per token, the sparse cache's GPU parts, activations.

Everything is arithmetic on the model's shape; nothing is allocated. docs/ARCHITECTURE.md describes the
tensors these count (the decode step, the sparse cache's shadows and index).
"""

from __future__ import annotations

from dataclasses import dataclass

from tierkv.kv.caches.window_ring import ROLLBACK_ROOM
from tierkv.models.config import ModelConfig

# The sparse cache keeps decode keys exact until this many sealed tokens pile up beyond the shadow
# (SparseOptions.fold_tokens in tierkv/kv/caches/eager_sparse.py); its pre-RoPE key ring is sized from it.
FOLD_TOKENS = 512
# GPU bytes the planner keeps free of everything it counts: cuBLAS workspaces, CUDA graph pools, the allocator's
# rounding. An allowance, not a measurement: the issue-18 bench compares the measured peak with the budget.
WORKSPACE_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class WeightSizes:
    """Weight bytes of one model at one dtype: every decoder layer, the embedding, lm_head, the final norm."""

    layer: tuple[int, ...]  # bytes of each decoder layer (attention + MLP + its two norms)
    embedding: int
    lm_head: int  # 0 when tied to the embedding (lm_head then reads the embedding table)
    final_norm: int

    @property
    def total(self) -> int:
        return sum(self.layer) + self.embedding + self.lm_head + self.final_norm


def weight_sizes(cfg: ModelConfig, elem_bytes: int) -> WeightSizes:
    """Bytes of each weight group of a Llama-family model (llama, qwen2, mistral layouts of tierkv/models)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    params = (qkv_out * d + (qkv_out if cfg.attention_bias else 0)  # q, k, v projections (+ bias)
              + cfg.num_heads * hd * d  # o projection
              + 3 * cfg.intermediate_size * d  # gate, up, down
              + 2 * d)  # input and post-attention RMSNorm weights
    embed = cfg.vocab_size * d * elem_bytes
    return WeightSizes(layer=(params * elem_bytes,) * cfg.num_layers, embedding=embed,
                       lm_head=0 if cfg.tie_word_embeddings else embed, final_norm=d * elem_bytes)


def layer_windows(cfg: ModelConfig, windows: tuple[int | None, ...] | None) -> tuple[int | None, ...]:
    """Per-layer sliding window (None: full attention). `windows` overrides; else the config's own per-layer
    windows (ModelConfig.window: Mistral, Qwen2/3 with use_sliding_window, Gemma 3)."""
    if windows is not None:
        return tuple(windows)
    return tuple(cfg.binding_window(i) for i in range(cfg.num_layers))


def kv_token_bytes_per_layer(cfg: ModelConfig, elem_bytes: int) -> int:
    """K and V bytes one token adds to one layer."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * elem_bytes


def window_kv_bytes(cfg: ModelConfig, elem_bytes: int, windows: tuple[int | None, ...], context: int) -> int:
    """GPU bytes of the K/V rings of the sliding-window layers (kv/caches/window_ring.py): min(window + the rings' rollback
    room, context) tokens each."""
    per = kv_token_bytes_per_layer(cfg, elem_bytes)
    return sum(min(w + ROLLBACK_ROOM, context) * per for w in windows if w is not None)


@dataclass(frozen=True)
class SparseShape:
    """The sparse cache's knobs that decide its sizes (TierConfig's rank, score_rank, chunk, sinks, window)."""

    rank: int
    score_rank: int
    chunk_size: int
    sink_tokens: int
    window_tokens: int
    prefill_chunk: int


def capacity_tokens(context: int, chunk: int) -> int:
    """Tokens the caches reserve: the context rounded up to whole chunks."""
    return -(-context // chunk) * chunk


def sparse_gpu_bytes_per_layer(cfg: ModelConfig, elem_bytes: int, context: int, sp: SparseShape) -> int:
    """GPU bytes one full-attention layer's sparse cache holds besides resident values (tierkv/kv/caches/sparse.py):
    shadow coefficients (tokens x rank, model dtype) and basis (rank x Hkv*D); the score index, int8 rows of
    score_rank plus one fp32 scale per token and KV head, and its basis (Hkv x score_rank x D) in the model dtype
    and in fp32 (one copy in an fp32 model); the pre-RoPE key ring (FOLD_TOKENS + 2 chunks + one prefill slice);
    per chunk an outlier flag byte, the shadow's fp32 error and its int64 outlier slot."""
    hkv, hd = cfg.num_kv_heads, cfg.head_dim
    cap = capacity_tokens(context, sp.chunk_size)
    rank, score_rank = min(sp.rank, hkv * hd), min(sp.score_rank, hd)
    shadow = cap * rank * elem_bytes + rank * hkv * hd * elem_bytes
    index = cap * hkv * (score_rank + 4) + hkv * score_rank * hd * (elem_bytes + (0 if elem_bytes == 4 else 4))
    ring = (FOLD_TOKENS + 2 * sp.chunk_size + sp.prefill_chunk) * hkv * hd * elem_bytes
    per_chunk = (1 + 4 + 8) * (cap // sp.chunk_size)
    return shadow + index + ring + per_chunk


def activation_bytes(cfg: ModelConfig, elem_bytes: int, prefill_chunk: int) -> int:
    """Peak GPU bytes of activations, set by a prefill slice of P = prefill_chunk tokens inside one layer:

        elem_bytes * P * (4 * hidden + qkv_out + 3 * intermediate) + 2 * 4 * vocab

    4 * hidden: the residual, the normed input, the attention output and a layer output; qkv_out = (H + 2 Hkv) * D:
    the q, k, v projections; 3 * intermediate: gate, up and their SwiGLU product; 2 * 4 * vocab: the fp32 logits of
    the last position and the sampler's copy. Fused span attention keeps no P x S score matrix."""
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_token = 4 * cfg.hidden_size + qkv_out + 3 * cfg.intermediate_size
    return elem_bytes * prefill_chunk * per_token + 2 * 4 * cfg.vocab_size
