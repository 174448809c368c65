"""PendingKeys: the pre-RoPE keys a refit waits for, un-rotated from the pool slice by slice, equal to un-rotating
every pool key at once and appending the buffered tail (what the refit read before, through a host copy)."""

import torch

from tierkv.kernels.rope import rotate_half
from tierkv.kv.sparse.state import PendingKeys, unrope


def _tables(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(n).float(), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def test_slices_equal_the_whole_unrotation_followed_by_the_tail():
    g = torch.Generator().manual_seed(0)
    n, upto, h, d = 50, 37, 2, 8
    cos, sin = _tables(n + 1, d)
    pre = torch.randn(n, h, d, generator=g)
    post = pre * cos[:n, None] + rotate_half(pre) * sin[:n, None]  # the pool: post-RoPE keys
    tail = torch.randn(n - upto, h, d, generator=g)  # exact keys that never entered the pool's recovery
    keys = PendingKeys(post, upto, tail, cos, sin)
    want = torch.cat([unrope(post[:upto], cos, sin), tail])
    assert keys.shape == (n, h, d)
    for s, e in [(0, n), (0, 16), (16, 32), (32, 48), (48, n), (37, 40), (10, 37), (5, 5)]:
        assert torch.equal(keys[s:e], want[s:e]), (s, e)
    assert torch.allclose(keys[0:upto], pre[:upto], atol=1e-5)  # the un-rotation recovers the model's keys


def test_no_pool_part_is_the_tail_alone():
    tail = torch.randn(6, 1, 4)
    cos, sin = _tables(7, 4)
    keys = PendingKeys(torch.empty(0, 1, 4), 0, tail, cos, sin)
    assert torch.equal(keys[0:6], tail) and keys[0:0].shape == (0, 1, 4)
