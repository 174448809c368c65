"""Chat sessions with attention="sparse" through the one sparse cache the factory builds (decode really sparse:
64 of ~900 tokens per step), with a cpu_budget that puts the oldest chunks on disk after turn 1's fit: each turn
prefills only its new tokens (also after the spill); saved after turn 2 and resumed in a new process, the third
reply equals the uninterrupted session's with no prefill of earlier turns; a rollback into a re-rendered reply and
a reset reply as a fresh session; other sparse settings and a damaged sparse state are refused."""

import json
import shutil

import pytest
import torch
from pydoc_data.topics import topics

from tests.chat.helpers import worker
from tests.chat.worker import state_digest
from tierkv.chat import Chat
from tierkv.config import TierConfig
from tierkv.kv.sparse.model_defaults import with_model_defaults
from tierkv.llm import LLM
from tierkv.session import SessionDamagedError, SessionMismatchError

# chunks of 8 tokens (368,640 bytes of K and V over SmolLM2's 30 layers in fp32): a capacity class of 1,536 tokens
# is 192 chunks (70.8 MB); 56 MB of host memory holds 151 of them, so ~90 chunks go to disk at the fit
SPARSE = dict(attention="sparse", chunk_size=8, sink_tokens=8, window_tokens=16, token_budget=64, cpu_budget=56_000_000)
CONTEXT = "\n\n".join(topics[k] for k in ("assert", "del", "while", "if"))  # ~850 tokens of Python docs
TURNS = ["What does the assert statement do?", "And what does del do?", "What about while?"]
MAX_NEW = 10


def sparse_llm(smol, **changes) -> LLM:
    """SmolLM2 under SPARSE and changes, the other fields at the model's defaults (as tierkv.load gives them)."""
    given = {**SPARSE, **changes}
    return LLM(smol.model, smol.tokenizer, with_model_defaults(TierConfig(**given), smol.cfg, given),
               source=smol.source, stop_ids=smol.stop_ids)


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sparse-disk"))


def dequantized(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """A saved shadow's or score index's coefficients as numbers (the index keeps int8 rows and fp32 row scales)."""
    c = state[prefix + "coeffs"]
    return c.float() * state[prefix + "row_scale"].unsqueeze(-1) if prefix + "row_scale" in state else c


def sparse_steps(chat: Chat) -> int:
    return chat.cache.stats()["sparse_steps"]


@pytest.fixture(scope="module")
def sparse_convo(smol, tmp_path_factory, disk_dir):
    """TURNS in one sparse session, saved after turn 2: each turn's reply, stats, sparse steps and tier bytes."""
    save_dir = tmp_path_factory.mktemp("sparse") / "after2"
    llm = sparse_llm(smol, disk_dir=disk_dir)
    out = {"save": save_dir, "turns": [], "llm": llm}
    with llm.chat(context=CONTEXT, max_new_tokens=MAX_NEW, progress=False) as chat:
        out["prefix"] = chat.prefix_len
        for i, text in enumerate(TURNS):
            before = sparse_steps(chat)
            reply = chat.send(text)
            out["turns"].append({"reply": reply, "stats": dict(chat.stats["last_turn"]),
                                 "sparse_steps": sparse_steps(chat) - before, "tier_bytes": chat.stats["tier_bytes"],
                                 "cache": chat.stats["cache"]})
            if i == 0:
                out["state_after_turn1"] = {k: v.clone() for k, v in chat.cache.extra_state().items()}
            if i == 1:
                chat.save(save_dir)
                out["saved_ids"], out["saved_state"] = list(chat.ids), state_digest(chat.cache)
    yield out
    llm.close()


def test_sparse_turns_prefill_only_new_tokens_with_chunks_on_host_and_disk(sparse_convo):
    turns = sparse_convo["turns"]
    assert all(t["cache"] == "sparse" and t["sparse_steps"] > 0 for t in turns)  # the one sparse cache, sparse
    assert all(t["tier_bytes"]["host"] > 0 and t["tier_bytes"]["disk"] > 0 for t in turns)  # both tiers hold K/V
    for before, t in zip(turns, turns[1:]):  # turns 2 and 3 prefill after the spill, only what the turn adds
        assert t["stats"]["rolled_back"] == 0 and t["stats"]["prefilled"] < 20
        assert t["stats"]["reused"] > before["stats"]["reused"]


def test_sparse_resume_in_new_process_equals_uninterrupted(sparse_convo, smol_folder, tmp_path):
    tier = {**SPARSE, "disk_dir": str(tmp_path)}
    r = worker("resume", str(sparse_convo["save"]), str(smol_folder), TURNS[2], str(MAX_NEW), json.dumps(tier))
    got = json.loads(r.stdout.strip().splitlines()[-1])
    third = sparse_convo["turns"][2]
    assert got["reply"] == third["reply"] and got["reply"]
    assert got["forward_tokens_during_load"] == []  # the load ran no prefill at all
    assert got["state_digest"] == sparse_convo["saved_state"]  # shadows, index, buffered keys: bit for bit
    assert got["restored"]["tokens"] == len(sparse_convo["saved_ids"]) == got["last_turn"]["reused"]
    assert got["last_turn"]["prefilled"] == third["stats"]["prefilled"] < 20  # only the new turn's tokens
    assert got["kv"]["cache"] == "sparse"  # (its capacity class, sized for the resumed tokens, fits cpu_budget)
    assert got["kv"]["sparse_steps"] == third["sparse_steps"] > 0


def test_sparse_rollback_into_a_rerendered_reply_equals_a_fresh_prefill(sparse_convo):
    llm = sparse_convo["llm"]
    with llm.chat(context=CONTEXT, max_new_tokens=MAX_NEW, progress=False) as chat:
        chat.send(TURNS[0])  # fits, then spills the oldest chunks to disk
        chat.messages[-1]["content"] = "It checks a condition."  # the template renders another reply
        rolled = chat.send(TURNS[1])
        s = chat.stats["last_turn"]
        history = chat.history
    assert s["rolled_back"] > 0
    with llm.chat(context=CONTEXT, max_new_tokens=MAX_NEW, progress=False) as fresh:
        fresh.messages = history[:3]  # the same conversation, its tokens prefilled at once
        assert fresh.send(TURNS[1]) == rolled == history[-1]["content"]
        assert fresh.ids == chat.ids


def test_sparse_reset_keeps_the_context_and_replies_as_a_fresh_session(smol, sparse_convo):
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
    for name in ("sparse.fitted", "sparse.fit_at", *[k for k in state if k.endswith(".covered")]):
        assert torch.equal(state[name], fresh[name]), name
    for layer in range(smol.cfg.num_layers):
        for part in ("shadow", "index"):
            p = f"sparse.{layer}.{part}."
            a, b = (dequantized(st, p) @ st[p + "basis"] for st in (state, fresh))
            # low-rank keys (values ~10); bases up to sign; an index coefficient may round a step or two apart (the
            # refit reads un-rotated keys for the folded tokens: measured up to 1.9 steps in one layer)
            step = fresh[p + "row_scale"].unsqueeze(-1) if part == "index" else 0  # (Hkv, S, 1); unit basis rows
            assert bool(((a - b).abs() <= 1e-3 + 3 * step).all()), (p, float((a - b).abs().max()))


@pytest.mark.parametrize("change", [{"rank": 32}, {"chunk_size": 32}, {"score_rank": 16}])
def test_sparse_session_with_other_shadow_settings_is_refused(smol, sparse_convo, change):
    llm = sparse_llm(smol, **change)
    key = next(iter(change))
    with pytest.raises(SessionMismatchError, match=f"{key}={getattr(sparse_convo['llm'].tier, key)}"):
        Chat.load(sparse_convo["save"], llm)


def test_damaged_sparse_state_is_reported_with_its_file(sparse_convo, tmp_path):
    session = tmp_path / "s"
    shutil.copytree(sparse_convo["save"], session)
    data = bytearray((session / "extra.safetensors").read_bytes())
    data[-len(data) // 3] ^= 0x10
    (session / "extra.safetensors").write_bytes(bytes(data))
    with pytest.raises(SessionDamagedError, match=r"extra\.safetensors"):
        Chat.load(session, sparse_convo["llm"])
