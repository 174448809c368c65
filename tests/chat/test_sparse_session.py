"""Chat sessions with attention="sparse" (decode really sparse: 128 of ~900 tokens per step): saved after turn
2 and resumed in a new process, the third reply equals the uninterrupted session's with no prefill of earlier
turns; reset keeps the context and the next reply equals a fresh session's; other sparse settings and a damaged
sparse state are refused."""

import json
import shutil

import pytest
import torch
from pydoc_data.topics import topics

from tests.chat.test_session import worker
from tests.chat.worker import state_digest
from tierkv.chat import Chat
from tierkv.config import TierConfig
from tierkv.llm import LLM
from tierkv.session import SessionDamagedError, SessionMismatchError

SPARSE = dict(attention="sparse", chunk_size=16, sink_tokens=16, window_tokens=32, token_budget=128)
CONTEXT = "\n\n".join(topics[k] for k in ("assert", "del", "while", "if"))  # ~850 tokens of Python docs
TURNS = ["What does the assert statement do?", "And what does del do?", "What about while?"]
MAX_NEW = 10


def sparse_llm(smol, **changes) -> LLM:
    return LLM(smol.model, smol.tokenizer, TierConfig(**{**SPARSE, **changes}), source=smol.source,
               stop_ids=smol.stop_ids)


def dequantized(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """A saved shadow's or score index's coefficients as numbers (the index keeps int8 rows and fp32 row scales)."""
    c = state[prefix + "coeffs"]
    return c.float() * state[prefix + "row_scale"].unsqueeze(-1) if prefix + "row_scale" in state else c


def sparse_steps(chat: Chat) -> int:
    return chat.cache.stats()["sparse"]["sparse_steps"]


@pytest.fixture(scope="module")
def sparse_convo(smol, tmp_path_factory):
    """TURNS in one sparse session, saved after turn 2: each turn's reply, stats and sparse steps."""
    save_dir = tmp_path_factory.mktemp("sparse") / "after2"
    llm = sparse_llm(smol)
    out = {"save": save_dir, "turns": [], "llm": llm}
    with llm.chat(context=CONTEXT, max_new_tokens=MAX_NEW, progress=False) as chat:
        out["prefix"] = chat.prefix_len
        for i, text in enumerate(TURNS):
            before = sparse_steps(chat)
            reply = chat.send(text)
            out["turns"].append({"reply": reply, "stats": dict(chat.stats["last_turn"]),
                                 "sparse_steps": sparse_steps(chat) - before})
            if i == 0:
                out["state_after_turn1"] = {k: v.clone() for k, v in chat.cache.extra_state().items()}
            if i == 1:
                chat.save(save_dir)
                out["saved_ids"], out["saved_state"] = list(chat.ids), state_digest(chat.cache)
    yield out
    llm.close()


def test_sparse_resume_in_new_process_equals_uninterrupted(sparse_convo, smol_folder):
    assert all(t["sparse_steps"] > 0 for t in sparse_convo["turns"])  # decode really was sparse
    r = worker("resume", str(sparse_convo["save"]), str(smol_folder), TURNS[2], str(MAX_NEW), json.dumps(SPARSE))
    got = json.loads(r.stdout.strip().splitlines()[-1])
    third = sparse_convo["turns"][2]
    assert got["reply"] == third["reply"] and got["reply"]
    assert got["forward_tokens_during_load"] == []  # the load ran no prefill at all
    assert got["state_digest"] == sparse_convo["saved_state"]  # shadows, index, buffered keys: bit for bit
    assert got["restored"]["tokens"] == len(sparse_convo["saved_ids"]) == got["last_turn"]["reused"]
    assert got["last_turn"]["prefilled"] == third["stats"]["prefilled"] < 20  # only the new turn's tokens
    assert got["sparse"]["sparse_steps"] == third["sparse_steps"] > 0
    assert got["sparse"]["attended_fraction"] < 0.25


def test_sparse_reset_keeps_the_context_and_replies_as_a_fresh_session(sparse_convo):
    llm = sparse_convo["llm"]
    with llm.chat(context=CONTEXT, max_new_tokens=MAX_NEW, progress=False) as chat:
        chat.send(TURNS[1])  # fits the shadows on context + this turn; reset must not keep that fit
        chat.reset()
        assert chat.stats["tokens_in_context"] == chat.prefix_len == sparse_convo["prefix"]
        assert [m["role"] for m in chat.history] == ["system"]
        before = sparse_steps(chat)
        reply = chat.send(TURNS[0])
        s = chat.stats["last_turn"]
        assert s["reused"] == chat.prefix_len and s["prefilled"] == sparse_convo["turns"][0]["stats"]["prefilled"]
        assert sparse_steps(chat) - before == sparse_convo["turns"][0]["sparse_steps"] > 0
        state = chat.cache.extra_state()
    assert reply == sparse_convo["turns"][0]["reply"]  # turn 1 of a fresh session
    fresh = sparse_convo["state_after_turn1"]  # the shadows were refitted as a fresh session fits them
    assert state.keys() == fresh.keys()
    for name in ("sparse.fitted", "sparse.fit_at", "sparse.lost", *[k for k in state if k.endswith(".covered")]):
        assert torch.equal(state[name], fresh[name]), name
    for layer in range(len(state["sparse.fitted"])):
        for part in ("shadow", "index"):
            p = f"sparse.{layer}.{part}."
            a, b = (dequantized(st, p) @ st[p + "basis"] for st in (state, fresh))
            # low-rank keys (values ~10); bases up to sign; an index coefficient may round to the next int8 step
            step = fresh[p + "row_scale"].unsqueeze(-1) if part == "index" else 0  # (Hkv, S, 1); unit basis rows
            assert bool(((a - b).abs() <= 1e-3 + 1.01 * step).all()), (p, float((a - b).abs().max()))


@pytest.mark.parametrize("change", [{"rank": 32}, {"chunk_size": 32}, {"score_rank": 16}])
def test_sparse_session_with_other_shadow_settings_is_refused(smol, sparse_convo, change):
    llm = sparse_llm(smol, **change)
    key = next(iter(change))
    with pytest.raises(SessionMismatchError, match=f"{key}={SPARSE.get(key, getattr(TierConfig(), key))}"):
        Chat.load(sparse_convo["save"], llm)


def test_damaged_sparse_state_is_reported_with_its_file(sparse_convo, tmp_path):
    session = tmp_path / "s"
    shutil.copytree(sparse_convo["save"], session)
    data = bytearray((session / "extra.safetensors").read_bytes())
    data[-len(data) // 3] ^= 0x10
    (session / "extra.safetensors").write_bytes(bytes(data))
    with pytest.raises(SessionDamagedError, match=r"extra\.safetensors"):
        Chat.load(session, sparse_convo["llm"])
