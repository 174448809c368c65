"""Saved sessions: resumed in a new process without re-prefilling, atomic against a killed save, checked for
damage and for the model they were made with; on the all-on-device and the tiered cache (the sparse cache's
sessions are in test_sparse_session.py)."""

import copy
import json
import shutil
import signal

import pytest
import torch

import tierkv
from tests.chat.helpers import MAX_NEW, TURNS, worker
from tierkv.chat import Chat
from tierkv.config import TierConfig
from tierkv.llm import LLM
from tierkv.session import SessionDamagedError, SessionError, SessionMismatchError


def test_resume_in_new_process_equals_uninterrupted(convo, smol_folder):
    r = worker("resume", str(convo["save"]), str(smol_folder), TURNS[2], str(MAX_NEW))
    got = json.loads(r.stdout.strip().splitlines()[-1])
    third = convo["turns"][2]
    assert got["reply"] == third["reply"]
    assert got["forward_tokens_during_load"] == []  # the load ran no prefill at all
    assert got["restored"]["tokens"] == len(convo["saved_ids"]) == got["last_turn"]["reused"]
    assert got["last_turn"]["prefilled"] == third["stats"]["prefilled"]  # only the new turn's tokens
    assert got["last_turn"]["rolled_back"] == 0


def test_tiered_save_and_load_match_dense(smol, convo, tmp_path):
    cfg = TierConfig(kv_gpu_budget=1_400_000, cpu_budget=150_000, disk_dir=str(tmp_path / "kv"), chunk_size=8,
                     sink_tokens=8, window_tokens=8)
    tiered = LLM(smol.model, smol.tokenizer, cfg, source=smol.source, stop_ids=smol.stop_ids)
    dense_dir, tiered_dir = convo["save"], tmp_path / "tiered"
    chat = Chat.load(dense_dir, tiered, max_new_tokens=MAX_NEW)  # a dense save loads into the tiered cache
    placed = chat.stats["tier_bytes"]
    assert placed["host"] > 0 and placed["disk"] > 0 and chat.ids == convo["saved_ids"]
    assert chat.stats["cache"] == "tiered" and chat.stats["path"]["kind"] == "tiered"
    chat.save(tiered_dir)  # and a tiered save, with chunks on every tier, round-trips
    chat.close()
    again = Chat.load(tiered_dir, tiered, max_new_tokens=MAX_NEW)
    assert again.send(TURNS[2]) == convo["turns"][2]["reply"]
    assert again.stats["last_turn"]["prefilled"] == convo["turns"][2]["stats"]["prefilled"]
    again.close()
    back = Chat.load(tiered_dir, smol, max_new_tokens=MAX_NEW)  # tiered save into the all-on-device cache
    assert back.send(TURNS[2]) == convo["turns"][2]["reply"]
    back.close()
    tiered.close()


@pytest.mark.slow
def test_killed_save_leaves_previous_save_loadable(tmp_path):
    llm = tierkv.load("llama-tiny", device="cpu", dtype="fp32")
    chat = llm.chat(context="some context " * 40, max_new_tokens=5)
    chat.send("first turn")
    session = tmp_path / "s"
    chat.save(session)
    before = (session / "session.json").read_bytes()
    r = worker("crash", str(session), "llama-tiny", "1", check=False)
    assert r.returncode == -signal.SIGKILL and "save finished" not in r.stdout
    assert list(tmp_path.glob(".s.tmp-*"))  # the half-written save is there, beside the intact one
    assert (session / "session.json").read_bytes() == before
    resumed = Chat.load(session, llm, max_new_tokens=5)
    assert resumed.ids == chat.ids and resumed.history == chat.history
    assert resumed.send("next") == chat.send("next")
    resumed.save(session)  # a later save replaces it (swap) and clears the dead temp dir
    assert not list(tmp_path.glob(".s.tmp-*")) and not list(tmp_path.glob(".s.old"))
    chat.close(), resumed.close()


@pytest.mark.parametrize("victim", ["kv/layer_005.bin", "tokens.bin", "session.json"])
def test_flipped_byte_is_reported_with_its_file(smol, convo, tmp_path, victim):
    session = tmp_path / "s"
    shutil.copytree(convo["save"], session)
    data = bytearray((session / victim).read_bytes())
    data[len(data) // 2] ^= 0x10
    (session / victim).write_bytes(bytes(data))
    with pytest.raises(SessionDamagedError, match=victim.replace(".", r"\.")) as err:
        Chat.load(session, smol)
    assert "\n" not in str(err.value)


def test_other_model_and_missing_session_are_refused(smol, convo, tmp_path):
    other = copy.copy(smol)
    other.model = copy.copy(smol.model)
    other.model.embed_tokens = smol.model.embed_tokens.clone()
    other.model.embed_tokens[0] += 1.0
    with pytest.raises(SessionMismatchError, match="weights differ"):
        Chat.load(convo["save"], other)
    tiny = tierkv.load("llama-tiny", device="cpu", dtype="fp32")
    with pytest.raises(SessionMismatchError, match="llama-tiny.*shape differ"):
        Chat.load(convo["save"], tiny)
    with pytest.raises(SessionMismatchError, match="dtype=float32"):
        Chat.load(convo["save"], _bf16(smol))
    with pytest.raises(SessionError, match="no tierkv session"):
        Chat.load(tmp_path, smol)


def _bf16(smol):
    """smol whose K/V dtype reads as bf16 (the check runs before any compute)."""
    fake = copy.copy(smol)
    fake.dtype = torch.bfloat16
    return fake
