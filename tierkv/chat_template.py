"""Rendering a conversation to token ids: the model's own chat template, or a plain 'role: text' fallback
for tokenizers without one (the random-weight shapes), named so it shows up in session stats."""

from __future__ import annotations

from typing import Sequence

from tierkv.errors import ConfigError


def template_mode(tokenizer) -> str:
    """'model' when the tokenizer carries a chat template, else 'plain'."""
    return "model" if getattr(tokenizer, "chat_template", None) else "plain"


def render(llm, messages: Sequence[dict], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of messages as the model's chat template renders them (plain 'role: text' lines without one)."""
    tok = llm.tokenizer
    if template_mode(tok) == "plain":
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return list(tok(text + ("assistant: " if add_generation_prompt else ""), add_special_tokens=False)["input_ids"])
    try:
        out = tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    except Exception as e:  # jinja raises its own errors, e.g. for a role the template refuses
        roles = ",".join(m["role"] for m in messages)
        raise ConfigError(f"the chat template of {llm.source!r} refused messages with roles {roles} ({e}); "
                          f"without a system role, pass context= as part of the first message instead") from None
    return list(out["input_ids"] if hasattr(out, "keys") else out)
