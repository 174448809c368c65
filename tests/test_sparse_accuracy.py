"""Issue 5 accuracy target on real weights: SmolLM2 over 6K tokens of pydoc text, sparse vs full attention
through llm.score (256 teacher-forced positions), plus a passkey at ~1K tokens. CPU, fp32, ~2-3 minutes."""

import pytest
import torch

from tierkv.llm import LLM

CONTEXT, STEPS = 6144, 256


def with_tier(llm: LLM, **tier) -> LLM:
    """The same weights and tokenizer under other tier settings."""
    return LLM(llm.model, llm.tokenizer, llm.tier.replace(**tier), llm.source, stop_ids=llm.stop_ids)


@pytest.fixture(scope="module")
def eighth_budget_scores(smol, text_ids):
    """Full and sparse (1/8 budget) log-probs of 256 teacher-forced positions after 6K tokens, computed once."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    try:
        ids = text_ids[:CONTEXT + STEPS]
        assert len(ids) == CONTEXT + STEPS
        full = with_tier(smol, attention="full").score(ids, CONTEXT)
        # 1/8 of the context alone: without budget_floor_tokens=0 the default floor would attend 2,048 tokens
        sparse_llm = with_tier(smol, attention="sparse", token_budget=0.125, budget_floor_tokens=0)
        assert sparse_llm.tier.budget_tokens(CONTEXT + STEPS) <= (CONTEXT + STEPS) // 8  # sinks, window included
        sparse = sparse_llm.score(ids, CONTEXT)
    finally:
        torch.set_num_threads(n)
    target = torch.tensor(ids[CONTEXT:])
    st = sparse_llm.last_stats.extra["kv"]
    agreement = (sparse.argmax(-1) == full.argmax(-1)).float().mean().item()
    nll_full = -full.gather(1, target[:, None]).mean().item()
    nll_sparse = -sparse.gather(1, target[:, None]).mean().item()
    print(f"agreement {agreement:.4f}, NLL full {nll_full:.4f} sparse {nll_sparse:.4f} "
          f"({100 * (nll_sparse / nll_full - 1):+.2f}%), stats {st}")
    assert st["path"]["kind"] == "sparse" and st["sparse_steps"] == STEPS - 1
    return agreement, nll_full, nll_sparse


@pytest.mark.slow
def test_sparse_nll_within_1_5_percent_of_full_at_one_eighth_budget(eighth_budget_scores):
    _, nll_full, nll_sparse = eighth_budget_scores
    assert nll_sparse <= nll_full * 1.015


# Measured 94.1% (241 of 256; the target needs 241) with the group-summed chunk mass; 93.4% with the group max.
@pytest.mark.slow
def test_sparse_top1_agrees_with_full_at_one_eighth_budget(eighth_budget_scores):
    agreement, _, _ = eighth_budget_scores
    assert agreement >= 0.94


def passkey_prompt(key: int, at: int, n_fill: int = 45) -> str:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    parts = [filler] * n_fill
    parts.insert(at, f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            + "".join(parts) + "What is the pass key? The pass key is")


@pytest.mark.slow
@pytest.mark.parametrize("key,at", [(68219, 10), (40573, 25), (91736, 38)])
def test_passkey_at_1k_tokens_is_retrieved_in_sparse_mode(smol, one_thread, key, at):
    prompt = passkey_prompt(key, at)
    assert 1000 <= len(smol.encode(prompt)) <= 1200
    assert str(key) in with_tier(smol, attention="full").generate(prompt, max_new_tokens=6)
    # 1/8 of the context (the fraction alone: the default 2,048-token floor would attend all ~1.1K tokens): 16-token
    # chunks, 16 sink and 32 window tokens leave room for picks
    eighth = with_tier(smol, attention="sparse", token_budget=0.125, budget_floor_tokens=0, chunk_size=16,
                       sink_tokens=16, window_tokens=32)
    assert str(key) in eighth.generate(prompt, max_new_tokens=6)
    assert eighth.stats["kv"]["sparse_steps"] > 0
    # default chunk, sinks and window
    quarter = with_tier(smol, attention="sparse", token_budget=0.25, budget_floor_tokens=0)
    assert str(key) in quarter.generate(prompt, max_new_tokens=6)
