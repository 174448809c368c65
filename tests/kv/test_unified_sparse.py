"""The one sparse cache on every path (kv/factory.py): score() through it computes what the eager oracle
(kv/caches/eager_sparse.py) computes, and the LLM keeps one cache per capacity class that a second generate call reuses unchanged
(on CUDA: with the same captured graph)."""

import pytest
import torch

from tierkv.engine import eager_step, prefill
from tierkv.kernels import chunk_topk
from tierkv.kv.factory import build_cache
from tierkv.kv.caches.sparse import SparseKVCache
from tierkv.kv.caches.eager_sparse import EagerSparseKVCache
from tierkv.kv.sparse.options import SparseOptions
from tierkv.llm import LLM

# 2,048 tokens of context, not the 6K of tests/test_sparse_accuracy.py (which already runs score() through this
# cache at 6K against full attention): the oracle's eager decode costs ~0.2 s/step on a shared 2-core runner and
# CI has about 2 minutes to spare. An absolute budget keeps the steps as sparse as 1/8 of 6K would.
CONTEXT, STEPS = 2048, 48
TIER = dict(attention="sparse", token_budget=256, chunk_size=32, sink_tokens=64, window_tokens=128)
FP32_NOISE = 1e-4  # attention outputs: the two caches sum the same terms in another order (measured <= 6.2e-6)


def with_tier(llm: LLM, **tier) -> LLM:
    return LLM(llm.model, llm.tokenizer, llm.tier.replace(**tier), llm.source, stop_ids=llm.stop_ids,
               graph=llm.graph)


def oracle_cache(llm: LLM, sparse: SparseOptions | None = None) -> EagerSparseKVCache:
    c = llm.cfg
    return EagerSparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=llm.device, dtype=llm.dtype,
                         config=llm.tier, rope=llm.model.rope, sparse=sparse)


def picked_chunks(index, q: torch.Tensor, plan) -> torch.Tensor:
    """The chunks (Hkv, k) a sparse step of `plan` (kv/sparse/select.py) picks per KV head for q (1, Hq, D) from a low-rank
    index's rows of its tokens (the new one's included), ascending: the chunk_topk call both caches make."""
    total = plan.sealed * plan.chunk_size + plan.open_tokens
    ids, _ = chunk_topk(index.project_query(q[0]), index.coeffs[:, :total], total, plan.window_start,
                        min(plan.picks, plan.candidates), plan.chunk_size, index.d ** -0.5, plan.sink_end,
                        index.reduce, row_scale=index.row_scale[:, :total])
    return ids.sort(-1).values


class Lockstep:
    """One model driving two caches: every append goes to both, every attention runs in both and the graph cache's
    output goes on into the model, so the oracle sees the same keys, values and queries at every layer and step.

    Two independent runs cannot be compared within fp32 noise: their hidden states differ by rounding (3e-5 in
    the log-probs from prefill on: the caches sum attention in another order), and that is enough to tip a
    near-tied chunk choice. At 2K tokens and a 256-token budget (one pick per head) the runs met such a tie at
    position 2072, layer 21, KV head 2 (chunks 13 and 20 within 5e-6 of each other in the log-mass, in
    opposite order in the two runs): the head's only pick changed, and with it every later position (log-probs up to
    1.3 apart). In lockstep a difference shows where it arises. No layer-after-layer prefill: the oracle has none,
    and on the CPU it gives the sliced prefill's bits (tests/kv/test_layer_prefill.py)."""

    prefetches_picks = False

    def __init__(self, cache: SparseKVCache, oracle: EagerSparseKVCache) -> None:
        self.cache, self.oracle = cache, oracle
        self.worst = 0.0  # max |attention output difference| over every layer, slice and step
        self.sparse_attentions = self.pick_differences = 0

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    def begin_layer_prefill(self, n: int, activation_bytes: int, device_limit: int | None = None) -> bool:
        return False

    def predicted_query(self, layer: int, make_q) -> None:
        pass

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor) -> None:
        self.cache.append(layer, k, v, k_pre)
        self.oracle.append(layer, k, v, k_pre)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        plan = self.oracle.plan(self.seq_len + q.shape[0])
        out, want = self.cache.attend(layer, q), self.oracle.attend(layer, q)
        self.worst = max(self.worst, float((out - want).abs().max()))
        if q.shape[0] == 1 and not plan.dense:
            self.sparse_attentions += 1
            mine, theirs = (picked_chunks(ix, q, plan) for ix in (self.cache.index[layer], self.oracle.index[layer]))
            self.pick_differences += not torch.equal(mine, theirs)
        return out

    def advance(self, n: int) -> None:
        self.cache.advance(n)
        self.oracle.advance(n)


def lockstep_score(llm: LLM, run: Lockstep, ids: list[int], prefill_len: int) -> torch.Tensor:
    """llm.score's prefill and teacher-forced steps, through the lockstep."""
    x = torch.tensor(ids, device=llm.device)
    rows = [prefill(llm.model, x[:prefill_len], run, llm.tier.prefill_chunk)[-1]]
    step = eager_step(llm.model, run)
    rows += [step(x[p:p + 1], p)[-1] for p in range(prefill_len, len(ids) - 1)]
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


def assert_same_sparse_state(cache: SparseKVCache, oracle: EagerSparseKVCache) -> None:
    """Bit for bit: every layer's score index (basis, int8 rows and scales of every token) and key shadow (basis,
    coefficients of the covered tokens, the same fit and fold points)."""
    n = cache.seq_len
    for layer in range(cache.num_layers):
        ix, oix, sh, osh = cache.index[layer], oracle.index[layer], cache.shadows[layer], oracle.shadows[layer]
        assert sh.covered == osh.covered
        assert torch.equal(ix.basis, oix.basis) and torch.equal(sh.basis, osh.basis)
        assert torch.equal(ix.coeffs[:, :n], oix.coeffs[:, :n])
        assert torch.equal(ix.row_scale[:, :n], oix.row_scale[:, :n])
        assert torch.equal(sh.coeffs[:sh.covered], osh.coeffs[:osh.covered])


@pytest.mark.slow
def test_score_through_the_sparse_cache_equals_the_eager_oracle(smol, text_ids, one_thread):
    llm = with_tier(smol, **TIER)
    ids = text_ids[:CONTEXT + STEPS]
    got = llm.score(ids, CONTEXT)
    kv = llm.stats["kv"]
    assert kv["cache"] == "sparse" and kv["path"]["kind"] == "sparse" and kv["sparse_steps"] == STEPS - 1
    cache, _ = build_cache(llm.cache_request(len(ids) + 1, "score"), llm.model.rope)
    run = Lockstep(cache, oracle_cache(llm))
    try:
        lockstep = lockstep_score(llm, run, ids, CONTEXT)
        print(f"max |attention difference| {run.worst:.2e} over every layer; {run.sparse_attentions} sparse "
              f"attentions, {run.pick_differences} with other picks")
        assert torch.equal(lockstep, got)  # the lockstep's graph cache is score()'s, bit for bit
        assert run.oracle.stats()["sparse"]["sparse_steps"] == STEPS - 1
        assert run.sparse_attentions == (STEPS - 1) * llm.cfg.num_layers and run.pick_differences == 0
        assert run.worst < FP32_NOISE
        assert_same_sparse_state(cache, run.oracle)
    finally:
        cache.close()
        run.oracle.close()
        llm.close()


@pytest.mark.slow
def test_the_sparse_cache_fits_and_folds_as_the_oracle_does(smol, text_ids, one_thread):
    """Fold timing: a fold every two chunks of new tokens (fold_tokens=64) with a one-chunk window, so a step that
    folded late would attend a picked chunk out of the window with exact keys where the oracle rebuilds them."""
    llm = with_tier(smol, **{**TIER, "window_tokens": 32})
    c, opts, prompt, ids = llm.cfg, SparseOptions(fold_tokens=64), 600, text_ids[:706]
    cache = SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=llm.device, dtype=llm.dtype,
                              config=llm.tier, capacity=len(ids) + 1, rope=llm.model.rope, sparse=opts)
    run = Lockstep(cache, oracle_cache(llm, opts))
    try:
        lockstep_score(llm, run, ids, prompt)
        assert cache.stats()["folds"] == 2 and cache.covered == 704  # fitted on 576 tokens, folded at 640 and 704
        assert run.sparse_attentions == (len(ids) - prompt - 1) * c.num_layers and run.pick_differences == 0
        assert run.worst < FP32_NOISE
        assert_same_sparse_state(cache, run.oracle)
    finally:
        cache.close()
        run.oracle.close()


SHORT = dict(attention="sparse", token_budget=48, chunk_size=8, sink_tokens=8, window_tokens=16)


@pytest.mark.slow
def test_a_second_generate_call_reuses_the_kept_cache_and_gives_a_fresh_llms_tokens(smol, text_ids):
    llm, fresh = with_tier(smol, **SHORT), with_tier(smol, **SHORT)
    prompts = [text_ids[:300], text_ids[400:690]]  # one capacity class (1,024 positions)
    first = list(llm.stream_ids(prompts[0], max_new_tokens=8))
    cache, _ = llm.kept("generate")
    epoch = cache.buffers_epoch
    second = list(llm.stream_ids(prompts[1], max_new_tokens=8))
    assert llm.kept("generate")[0] is cache and cache.buffers_epoch == epoch  # reused, nothing reallocated
    assert llm.stats["kv"]["sparse_steps"] == 7  # counters restart with each call
    assert first == list(fresh.stream_ids(prompts[0], max_new_tokens=8))
    assert second == list(with_tier(smol, **SHORT).stream_ids(prompts[1], max_new_tokens=8))
    list(llm.stream_ids(text_ids[:1100], max_new_tokens=2))  # another capacity class: a new cache
    assert llm.kept("generate")[0] is not cache and llm.kept("generate")[0].capacity > cache.capacity
    llm.close()
    fresh.close()
    assert llm.kept("generate")[0] is None


@pytest.mark.cuda
def test_generate_calls_and_chat_turns_capture_once_and_match_eager_on_cuda(smol_folder, text_ids):
    import tierkv

    graph = tierkv.load(str(smol_folder), device="cuda", dtype="fp32", **SHORT)
    eager = tierkv.load(str(smol_folder), device="cuda", dtype="fp32", graph=False, **SHORT)
    for ids in (text_ids[:300], text_ids[400:690]):
        assert list(graph.stream_ids(ids, max_new_tokens=16)) == list(eager.stream_ids(ids, max_new_tokens=16))
    cache, step = graph.kept("generate")
    assert step is not None and step.captures == 1 and step.replays > 0
    turns = ["What does assert do?", "And del?", "And while?"]
    with graph.chat(context="Notes: assert, del and while.", max_new_tokens=12, progress=False) as g, eager.chat(context="Notes: assert, del and while.", max_new_tokens=12,
                                                     progress=False) as e:
        for t in turns:
            assert g.send(t) == e.send(t)
        assert g.graph_step.captures == 1 and g.stats["path"]["captured"]
    graph.close()
    eager.close()
