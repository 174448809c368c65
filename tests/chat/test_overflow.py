"""A chat whose history fills the context: drop-oldest keeps the context= prefix and drops the oldest turns;
refuse raises ContextTooLongError pointing at reset."""

from __future__ import annotations

import pytest

import tierkv
from tierkv.errors import ConfigError, ContextTooLongError


@pytest.fixture(scope="module")
def tiny():
    return tierkv.load("llama-tiny", device="cpu", ctx_size=160)  # byte tokens: 160 characters of rendering


def test_drop_oldest_keeps_the_context_and_the_newest_turns(tiny):
    with tiny.chat(context="FACTS", max_new_tokens=8) as chat:
        prefix = list(chat.ids)  # the system message holding the context, prefilled at the start
        for i in range(8):
            chat.send(f"message number {i}")
            assert chat.stats["tokens_in_context"] <= 160
        hist = chat.history
        assert hist[0] == {"role": "system", "content": "FACTS"}
        users = [m["content"] for m in hist if m["role"] == "user"]
        assert users[-1] == "message number 7" and "message number 0" not in users and len(users) < 8
        assert [m["role"] for m in hist[1:]] == ["user", "assistant"] * len(users)
        assert chat.ids[:len(prefix)] == prefix and chat.cache.seq_len == len(chat.ids)


def test_refuse_raises_with_a_hint_to_reset_and_keeps_the_session(tiny):
    with tiny.chat(context="FACTS", max_new_tokens=8, overflow="refuse") as chat:
        with pytest.raises(ContextTooLongError, match=r"/reset"):
            for i in range(8):
                chat.send(f"message number {i}")
        turns = chat.stats["turns"]
        assert 0 < turns < 8 and chat.history[0]["content"] == "FACTS"
        chat.reset()
        chat.send("after the reset")
        assert chat.stats["turns"] == 1


def test_unknown_policy_and_empty_message_are_refused(tiny):
    with pytest.raises(ConfigError, match="overflow='oldest' is unknown"):
        tiny.chat(overflow="oldest")
    with tiny.chat() as chat, pytest.raises(ConfigError, match="the message is empty"):
        chat.send("  ")
