"""GPU kernels of the decode step, each a torch reference `<op>_torch` beside a Triton twin `<op>_triton`.

The entry points below dispatch per device (see dispatch.py); pass impl="torch"|"triton" to force one.
"""

from tierkv.kernels.chunk_topk import chunk_topk, chunk_topk_torch
from tierkv.kernels.decode_attention import (
    decode_attention,
    decode_attention_torch,
    merge_partials,
    merge_partials_torch,
    paged_decode_attention,
    paged_decode_attention_torch,
)
from tierkv.kernels.dispatch import implementation
from tierkv.kernels.rebuild_keys import rebuild_keys, rebuild_keys_torch
from tierkv.kernels.rope import rope_torch
from tierkv.kernels.shadow_attention import shadow_paged_attention, shadow_paged_attention_torch
from tierkv.kernels.sparse_entries import sparse_entries, sparse_entries_torch

__all__ = [
    "chunk_topk", "chunk_topk_torch", "decode_attention", "decode_attention_torch", "implementation",
    "merge_partials", "merge_partials_torch", "paged_decode_attention", "paged_decode_attention_torch",
    "rebuild_keys", "rebuild_keys_torch", "rope_torch", "shadow_paged_attention", "shadow_paged_attention_torch",
    "sparse_entries", "sparse_entries_torch",
]
