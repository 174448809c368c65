"""WeightStreamer on the CPU: exact-size blocks, slot contents, ring order, and the slot-reuse guard."""

from __future__ import annotations

import pytest
import torch

from tierkv.weights.stream import BlockLayout, WeightStreamer


def layer(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"wq": torch.randn(24, 16, generator=g).to(torch.bfloat16),
            "norm": torch.randn(16, generator=g),  # fp32 beside bf16: the layout keeps both aligned
            "w_down": torch.randn(16, 40, generator=g).to(torch.bfloat16),
            "bias": torch.randn(3, generator=g).to(torch.bfloat16)}


def exact_bytes(t: dict[str, torch.Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in t.values())


def test_block_is_exact_size_and_views_round_trip():
    t = layer(0)
    lay = BlockLayout.of(t)
    assert lay.nbytes == exact_bytes(t) == 24 * 16 * 2 + 16 * 4 + 16 * 40 * 2 + 3 * 2
    assert lay.names[0] == "norm"  # 4-byte elements first
    block = torch.zeros(lay.nbytes, dtype=torch.uint8)
    for name, view in lay.views(block).items():
        view.copy_(t[name])
    for name, view in lay.views(block).items():
        assert torch.equal(view, t[name])


def test_streamed_layers_arrive_in_their_slots_in_ring_order():
    layers = {i: layer(i) for i in (1, 4, 7, 10)}
    st = WeightStreamer(layers, "cpu", slots=2)
    assert st.stats()["mode"] == "cpu"
    assert st.stats()["host_bytes"] == sum(exact_bytes(t) for t in layers.values())
    assert [h.numel() for h in st.host.values()] == [exact_bytes(t) for t in layers.values()]
    seen = []
    for _token in range(2):
        for i in (1, 4, 7, 10):
            got = st.fetch(i)
            seen.append(st.slot_of(i))
            for name, x in layers[i].items():
                assert torch.equal(got[name], x), (i, name)
            slot = st.slots[st.slot_of(i)]
            nbytes = st.layout[i].nbytes
            assert torch.equal(slot[:nbytes], st.host[i])  # the slot holds the layer's bytes, exactly
            st.release(i)
    assert seen == [0, 1, 0, 1] * 2
    s = st.stats()
    # each layer is copied once per token: fetch(1) queues 1 and 4, fetch(4) queues 7, ..., and fetch(10) queues
    # the next token's layer 1 already (prefetch crosses the token boundary): 2 tokens x 4 + 1
    assert s["copies"] == 9 and s["fetches"] == 8
    assert s["bytes"] == 2 * s["host_bytes"] + st.layout[1].nbytes


def test_fetch_before_release_is_refused():
    st = WeightStreamer({i: layer(i) for i in (0, 1, 2, 3)}, "cpu", slots=2)
    st.fetch(0)
    st.fetch(1)
    with pytest.raises(RuntimeError, match="release it first"):
        st.fetch(2)  # slot 0 still holds layer 0


def test_an_odd_count_still_prefetches_across_the_token_boundary():
    # 3 streamed layers in 2 slots: the last release of a token frees slot 0 and queues the next token's first layer
    layers = {i: layer(i) for i in (2, 5, 8)}
    st = WeightStreamer(layers, "cpu", slots=2)
    for token in range(2):
        st.begin_token()
        for i in (2, 5, 8):
            got = st.fetch(i)
            assert all(torch.equal(got[n], x) for n, x in layers[i].items())
            st.release(i)
        st.end_token()
        assert st.slot_layer == [0, None]  # layer 2 (plan position 0) is already in slot 0
        assert st.stats()["copies"] == 3 * token + 4


def test_a_pass_cut_short_starts_over_at_the_next_begin():
    layers = {i: layer(i) for i in (0, 1, 2, 3)}
    st = WeightStreamer(layers, "cpu", slots=2)
    st.begin_token()
    st.fetch(0)  # an error in layer 0: no release
    st.begin_token()
    for i in range(4):
        assert torch.equal(st.fetch(i)["wq"], layers[i]["wq"])
        st.release(i)
