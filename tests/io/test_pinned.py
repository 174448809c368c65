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


@pytest.mark.cuda
def test_region_pinned_pins_regions_on_demand_and_maps_them():
    from tierkv.io.pinned import RegionPinned
    region = 3 * 4096 * 5  # page-multiple parts that share no page, not 2 MiB aligned
    buf = RegionPinned(4 * region, regions=4)
    assert buf._pinned == [True, False, False, False]  # region 0 at once: the mapped view needs its address
    dev = torch.device("cuda")
    view = map_pinned(buf.tensor, dev)
    buf.pin(2)
    buf.tensor[2 * region:3 * region].fill_(9)
    assert int(view[2 * region:3 * region].sum().item()) == 9 * region  # the GPU reads the region in place
    buf.pin_all()
    assert buf.all_pinned
    buf.tensor.copy_(torch.arange(4 * region, dtype=torch.int64).remainder(251).to(torch.uint8))
    for r in range(4):  # a copy-engine read may not span two registrations (H100: invalid argument)
        part = slice(r * region, (r + 1) * region)
        assert torch.equal(view[part].cpu(), buf.tensor[part])
    # parts that would share a page: one region
    assert RegionPinned(3 * 1000, regions=3).region_bytes == 3000


@pytest.mark.cuda
def test_the_sparse_pool_is_pinned_layer_by_layer_as_a_layer_major_prefill_writes_it():
    """A new capacity class pins its host pool a layer at a time during prefill, not whole before it."""
    import tierkv
    from tierkv.engine import prefill

    llm = tierkv.load("llama3.2-1b", device="cuda", dtype="bfloat16", attention="sparse", warm_up=False)
    n = 6000
    cache = llm.new_cache(n + 8)
    assert all(p._pinned == [True] + [False] * (llm.cfg.num_layers - 1) for p in cache._pins)
    pinned_before, pool_layer = [], cache.pool_layer

    def spy(layer):
        pinned_before.append(sum(cache._pins[0]._pinned))
        return pool_layer(layer)

    cache.pool_layer = spy
    ids = torch.randint(0, llm.cfg.vocab_size, (n,), device="cuda")
    logits = prefill(llm.model, ids, cache, llm.tier.prefill_chunk)
    assert cache.stats()["layer_prefills"] == 1
    assert pinned_before == [max(1, i) for i in range(llm.cfg.num_layers)]  # layer i found i layers pinned
    assert all(p.all_pinned for p in cache._pins)
    torch.cuda.synchronize()
    k_last = cache._host[0].view(llm.dtype).view(cache.pool_shape)[-1].reshape(-1, *cache.pool_shape[-2:])
    assert torch.isfinite(logits).all() and k_last[:n].abs().sum() > 0 and k_last[n:].abs().sum() == 0
    llm.close()
