"""ResidentChunks: which rows positions map to, what copy_from copies, what it costs."""

import torch

from tierkv.kv.storage.resident import ResidentChunks


def test_positions_map_to_their_rows_inside_the_copied_chunks_and_to_scratch_before_them():
    res = ResidentChunks((2, 5, 4, 3, 8), 2, keys=False, device=torch.device("cpu"), dtype=torch.float32)
    assert (res.n, res.start) == (2, 3) and res.k is None  # chunks 3 and 4 of 5, chunk size 4
    at = torch.tensor([0, 5, 11, 12, 15, 19])
    assert res.rows(at).tolist() == [8, 9, 11, 0, 3, 7]  # before chunk 3: scratch row 2 (tokens 8..11)
    assert res.nbytes == 2 * 3 * 4 * 3 * 8 * 4


def test_copy_from_copies_the_pools_tokens_from_the_first_copied_chunk_up_to_total():
    gen = torch.Generator().manual_seed(0)
    k_pool, v_pool = (torch.randn(2, 5, 4, 3, 8, generator=gen) for _ in range(2))
    res = ResidentChunks(tuple(k_pool.shape), 3, keys=True, device=torch.device("cpu"), dtype=torch.float32)
    res.copy_from(k_pool, v_pool, total=15)  # chunks 2, 3 and 3 tokens of chunk 4
    flat = (2, -1, 3, 8)
    for pool, copy in ((k_pool, res.k), (v_pool, res.v)):
        assert torch.equal(copy.view(flat)[:, :7], pool.view(flat)[:, 8:15])
        assert not copy.view(flat)[:, 7:].any()  # past total and the scratch row: untouched zeros
    k, v = res.chunks(1)
    assert k.shape == v.shape == (3, 4, 3, 8) and torch.equal(v[0], v_pool[1, 2])
