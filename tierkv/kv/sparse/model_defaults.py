"""Sparse settings that follow from the model: narrow keys stay exact.

TierConfig's rank 96, score rank 48 and 32-token chunks were chosen on wide keys: Llama 3.1 8B's layers carry
1,024 key values per token (8 KV heads x 128), so exact keys at 128K would hold 8.6 GB of the GPU and the shadow
keeps 0.8 GB. A model whose layers carry at most NARROW_KEY_WIDTH values per token (Gemma 3 270M: 1 x 256;
SmolLM2-135M: 3 x 64) keeps exact keys for little (Gemma 3 270M at 32K: 50 MB for its 3 full-attention layers),
and rank 96 of 256 is what limited its fidelity. Measured on Gemma 3 270M at 32,512 tokens with 2,048 attended
(CPU fp32, pydoc text; bench/results/long-fidelity-gemma3-270m-32512-*-2026-12-0[67].json), top-1 agreement with
full attention: 87.9% at rank 96 / score rank 48 / chunk 32; 92.2% with exact keys and score rank 128 at chunk 32
(the oracle there: 92.6%); 94.9% with 16-token chunks too (the oracle at 16 tokens: 94.9%). SmolLM2 at 6K with
1/8 of the context: 94.5% -> 95.3%.
"""

from __future__ import annotations

from tierkv.config import TierConfig
from tierkv.models.config import ModelConfig

NARROW_KEY_WIDTH = 256  # key values per token and layer (KV heads x head dim) at or under which keys stay exact


def model_sparse_defaults(cfg: ModelConfig) -> dict[str, int]:
    """TierConfig fields whose default differs for this model (empty for wide keys): exact keys (the shadow's rank
    is the key width), a score index of up to 128 per KV head, 16-token chunks."""
    width = cfg.num_kv_heads * cfg.head_dim
    if width > NARROW_KEY_WIDTH:
        return {}
    return {"rank": width, "score_rank": min(128, cfg.head_dim), "chunk_size": 16}


def with_model_defaults(tier: TierConfig, cfg: ModelConfig, given) -> TierConfig:
    """tier with the model's defaults (model_sparse_defaults) for the fields not in `given` (the names a caller set)."""
    changes = {k: v for k, v in model_sparse_defaults(cfg).items() if k not in given}
    return tier.replace(**changes) if changes else tier
