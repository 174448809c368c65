"""Chat turns reuse the cache: only new tokens are prefilled, and replies equal a fresh run of the whole
conversation (greedy). Also reset, streaming, rollback where the cache and the template disagree, and budgets."""

import pytest

from tests.chat.helpers import CONTEXT, MAX_NEW, SYSTEM, TURNS
from tierkv.chat import Chat, ChatClosedError
from tierkv.config import TierConfig
from tierkv.errors import BudgetError
from tierkv.llm import LLM


def test_turns_prefill_only_new_tokens(convo):
    for i, t in enumerate(convo["turns"]):
        s, cached, prompt = t["stats"], t["cached_before"], t["prompt"]
        assert prompt[:len(cached)] == cached  # the template re-renders earlier turns as the cache holds them
        assert s["rolled_back"] == 0 and s["reused"] == len(cached)
        assert s["prefilled"] == len(prompt) - len(cached)
        if i > 0:  # only the end of the last reply, the new user turn and the assistant header
            assert 0 < s["prefilled"] < 20 < s["reused"]
        assert 0 < s["new_tokens"] <= MAX_NEW
    assert convo["turns"][0]["stats"]["reused"] == convo["prefix"] > 0


def test_replies_equal_fresh_model_given_whole_conversation(smol, convo):
    for t in convo["turns"]:
        fresh = smol.generate(messages=t["history"][:-2] + [t["history"][-2]], max_new_tokens=MAX_NEW)
        assert t["reply"] == fresh
    assert convo["turns"][0]["history"][0] == {"role": "system", "content": SYSTEM + "\n\n" + CONTEXT}


def test_stream_reset_and_rollback(smol):
    with smol.chat(context=CONTEXT, max_new_tokens=3) as chat:
        prefix = chat.prefix_len
        pieces = list(chat.stream(TURNS[0]))
        assert "".join(pieces) == chat.history[-1]["content"] and chat.stats["turns"] == 1
        n = chat.stats["tokens_in_context"]
        assert n == len(chat.ids) > prefix
        # a history edited behind the cache's back: the cache rolls back to the common prefix
        chat.messages[-1]["content"] = "Something else entirely."
        chat.send(TURNS[1], max_new_tokens=1)
        s = chat.stats["last_turn"]
        assert s["rolled_back"] > 0 and s["reused"] + s["rolled_back"] == n
        chat.reset()
        assert chat.stats["tokens_in_context"] == prefix and chat.history == chat.history[:1]
        chat.send(TURNS[0], max_new_tokens=1)
        assert chat.stats["last_turn"]["reused"] == prefix
    with pytest.raises(ChatClosedError):
        chat.send("hello")


def test_sessions_share_the_llm_budgets(smol, tmp_path):
    cfg = TierConfig(kv_gpu_budget=4_000_000, cpu_budget=1_000_000, disk_dir=str(tmp_path), chunk_size=8,
                     sink_tokens=8, window_tokens=8)
    llm = LLM(smol.model, smol.tokenizer, cfg, source=smol.source, stop_ids=smol.stop_ids)
    a = Chat(llm, budget_share=0.5, max_new_tokens=2)
    b = Chat(llm, max_new_tokens=2)  # takes what a left
    assert a.stats["budget_bytes"]["device"] + b.stats["budget_bytes"]["device"] <= 4_000_000
    assert a.stats["budget_bytes"]["host"] + b.stats["budget_bytes"]["host"] <= 1_000_000
    with pytest.raises(BudgetError, match="shared by this LLM's chat sessions"):
        Chat(llm)
    ra, rb = a.send("Say A."), b.send("Say B.")
    assert [m["content"] for m in a.history] == ["Say A.", ra] and [m["content"] for m in b.history] == ["Say B.", rb]
    assert ra == smol.generate(messages=a.history[:1], max_new_tokens=2)
    assert rb == smol.generate(messages=b.history[:1], max_new_tokens=2)
    b.close()
    Chat(llm, budget_share=0.5).close()  # b's share came back
    llm.close()
