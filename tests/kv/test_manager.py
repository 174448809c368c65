"""TierManager: placement order, eviction under pressure, promotion, budgets, pinned sinks and window."""

import random

import pytest
import torch

from tierkv.errors import BudgetError
from tierkv.kv.storage.layout import ChunkId, ChunkLayout
from tierkv.kv.placement.manager import DEVICE, DISK, HOST, TIERS, LRUPolicy, Move, TierBudgets, TierManager


def layout(layers=1, chunk=4):
    return ChunkLayout(layers, 2, 8, chunk, torch.float32)


def C(i, layer=0):
    return ChunkId(layer, i)


def check_budgets(m: TierManager):
    for t in TIERS:
        cap = m.budgets.of(t)
        assert cap is None or m.used_slots(t) <= cap
        assert m.used_bytes(t) == len(m.chunks_in(t)) * m.layout.chunk_bytes
    assert all(m.tier_of(c) == DEVICE for t in TIERS for c in m.chunks_in(t) if m.is_pinned(c))


def test_layout_bytes():
    lay = ChunkLayout(3, 2, 8, 4, torch.bfloat16)
    assert lay.shape == (2, 4, 2, 8)
    assert lay.chunk_bytes == 2 * 4 * 2 * 8 * 2
    assert lay.token_range(2) == (8, 12) and lay.chunks_covering(9) == 3 and lay.sink_chunks(0) == 0


def test_placement_device_then_host_then_disk_lru_order():
    m = TierManager(layout(), TierBudgets(device=2, host=2))
    assert m.add(C(0)) == [Move(C(0), None, DEVICE)]
    assert m.add(C(1)) == [Move(C(1), None, DEVICE)]
    assert m.add(C(2)) == [Move(C(0), DEVICE, HOST), Move(C(2), None, DEVICE)]
    assert m.add(C(3)) == [Move(C(1), DEVICE, HOST), Move(C(3), None, DEVICE)]
    # both full: the oldest host chunk goes to disk first, then the oldest device chunk to host
    assert m.add(C(4)) == [Move(C(0), HOST, DISK), Move(C(2), DEVICE, HOST), Move(C(4), None, DEVICE)]
    assert [m.tier_of(C(i)) for i in range(5)] == [DISK, HOST, HOST, DEVICE, DEVICE]
    check_budgets(m)


def test_zero_host_budget_spills_straight_to_disk():
    m = TierManager(layout(), TierBudgets(device=1, host=0))
    m.add(C(0))
    assert m.add(C(1)) == [Move(C(0), DEVICE, DISK), Move(C(1), None, DEVICE)]


def test_access_updates_recency_and_hits():
    m = TierManager(layout(), TierBudgets(device=2, host=4))
    for i in range(3):
        m.add(C(i))
    assert m.access([C(1)]) == []  # no promotion asked
    assert m.hits == {DEVICE: 1, HOST: 0, DISK: 0}
    m.access([C(0)])  # C(0) on host: counts a host hit
    assert m.hits[HOST] == 1
    m.access([C(2)])
    # device now holds 1, 2 with 1 older than 2: the next chunk evicts 1
    assert m.add(C(3))[0] == Move(C(1), DEVICE, HOST)


def test_promotion_pulls_chunks_up_and_never_evicts_the_requested_ones():
    m = TierManager(layout(), TierBudgets(device=2, host=1))
    for i in range(5):
        m.add(C(i))
    assert [m.tier_of(C(i)) for i in range(5)] == [DISK, DISK, HOST, DEVICE, DEVICE]
    moves = m.access([C(0), C(3)], promote=True)
    assert moves == [Move(C(2), HOST, DISK), Move(C(4), DEVICE, HOST), Move(C(0), DISK, DEVICE)]
    assert m.tier_of(C(0)) == DEVICE and m.tier_of(C(3)) == DEVICE
    check_budgets(m)


def test_promotion_without_room_leaves_chunk_in_place():
    m = TierManager(layout(), TierBudgets(device=1, host=0), sink_tokens=4)  # chunk 0 is a pinned sink
    m.add(C(0))
    m.add(C(1))
    assert m.tier_of(C(1)) == DISK
    assert m.access([C(1)], promote=True) == []
    assert m.tier_of(C(1)) == DISK


def test_sinks_and_window_stay_on_device():
    lay = layout(layers=2)
    m = TierManager(lay, TierBudgets(device=2 * 3 + 1, host=3), sink_tokens=4, window_tokens=8)
    for i in range(12):
        for layer in range(2):
            m.add(C(i, layer))
            check_budgets(m)
            for j in range(i + 1):
                c = C(j, layer)
                if j == 0 or j >= i - 1:  # sink chunk and the two newest
                    assert m.tier_of(c) == DEVICE, (i, c)
                assert m.is_pinned(c) == (j == 0 or j >= i - 1)


def test_device_budget_smaller_than_pinned_is_refused():
    with pytest.raises(BudgetError, match="sink_tokens"):
        TierManager(layout(layers=4), TierBudgets(device=7, host=1), sink_tokens=4, window_tokens=4)


def test_bounded_disk_full_raises_budget_error():
    m = TierManager(layout(), TierBudgets(device=1, host=1, disk=1))
    for i in range(3):
        m.add(C(i))
    with pytest.raises(BudgetError, match="no tier has room"):
        m.add(C(3))


def test_random_workload_never_exceeds_budgets():
    rng = random.Random(0)
    lay = layout(layers=3)
    m = TierManager(lay, TierBudgets(device=3 * 2 + 3, host=5), sink_tokens=4, window_tokens=4)
    for i in range(30):
        for layer in range(3):
            m.add(C(i, layer))
            check_budgets(m)
        picks = [C(rng.randrange(i + 1), rng.randrange(3)) for _ in range(3)]
        m.access(picks, promote=rng.random() < 0.5)
        check_budgets(m)
    assert sum(m.used_slots(t) for t in TIERS) == 90
    assert m.stats()["bytes"][DISK] == m.used_slots(DISK) * lay.chunk_bytes


def test_drop_and_out_of_order_seal():
    m = TierManager(layout(), TierBudgets(device=2, host=2))
    m.add(C(0))
    assert m.drop(C(0)) == [Move(C(0), DEVICE, None)]
    assert C(0) not in m and m.used_slots(DEVICE) == 0
    with pytest.raises(ValueError, match="out of order"):
        m.add(C(5))


class NewestFirst(LRUPolicy):
    """A replacement policy: evicts the most recent chunk (shows the policy is pluggable)."""

    def victim(self, tier, protected):
        for chunk in reversed(self._order[tier]):
            if not protected(chunk):
                return chunk
        return None


def test_policy_is_replaceable():
    m = TierManager(layout(), TierBudgets(device=2, host=4), policy=NewestFirst())
    m.add(C(0))
    m.add(C(1))
    assert m.add(C(2))[0] == Move(C(1), DEVICE, HOST)
    m.observe_scores([C(0)], [1.0])  # accepted and ignored by LRU-style policies
