"""Exact-size pinned host memory (`pinned_empty`): page-locked, mapped for in-place GPU reads, released."""

import pytest
import torch

from tierkv.io.pinned import pinned_empty
from tierkv.kv.storage.host import map_pinned


@pytest.mark.cuda
def test_pinned_empty_is_exact_locked_and_mapped():
    n = (5 << 20) + 4096 + 17  # not a power of two: torch's caching allocator would round it up
    t = pinned_empty(n)
    assert t.shape == (n,) and t.dtype == torch.uint8 and t.is_pinned()
    t.copy_(torch.arange(n, dtype=torch.int64).remainder(253).to(torch.uint8))
    dev = torch.device("cuda")
    view = map_pinned(t, dev)
    idx = torch.tensor([0, n - 1, 123457], device=dev)
    assert torch.equal(view.index_select(0, idx).cpu(), t[[0, n - 1, 123457]])
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    dst.copy_(t, non_blocking=True)  # an async copy from page-locked memory
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), t)


@pytest.mark.cuda
def test_pinned_empty_returns_memory():
    """Allocating and freeing 1 GiB ten times must not keep 10 GiB locked (the caching allocator keeps blocks),
    nor take device memory."""
    import psutil
    free_before = torch.cuda.mem_get_info()[0]
    proc = psutil.Process()
    base = proc.memory_info().rss
    for _ in range(10):
        t = pinned_empty(1 << 30)
        t[:: 4096].fill_(1)  # touch every page
        del t
    assert proc.memory_info().rss - base < (1 << 30)
    assert torch.cuda.mem_get_info()[0] >= free_before - (64 << 20)
