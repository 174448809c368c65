"""Concurrency: two processes saving to one session directory, and two chats sharing one LLM.

Saves are last-writer-wins: each save fills its own temp directory and swaps it in whole (tierkv/io/dirswap.py),
so the directory always holds one complete save. The writers are real processes looping real saves at once.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tierkv.errors import TierKVError
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.session import read_manifest, read_tokens, restore_kv

L, HKV, D, N = 2, 2, 8, 300

WRITER = textwrap.dedent(f"""
    import os, sys, time, torch
    from tierkv.kv.caches.dense import DenseKVCache
    from tierkv.session import save_session
    path, writer, saves = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    while not os.path.exists(path + ".go"):  # both start their first save (onto no directory) together
        time.sleep(0.001)
    for i in range(saves):
        g = torch.Generator().manual_seed(1000 * writer + i)
        cache = DenseKVCache({L}, {HKV}, {D}, device="cpu", dtype=torch.float32, capacity={N})
        for layer in range({L}):
            cache.append(layer, torch.randn({N}, {HKV}, {D}, generator=g), torch.randn({N}, {HKV}, {D}, generator=g))
        cache.advance({N})
        ids = [(writer * 7 + i + t) % 50000 for t in range({N})]
        save_session(path, {{"model": {{}}, "writer": writer, "save": i}}, ids, cache, block_tokens=64)
    print("done", writer)
""")


def expected(writer: int, i: int) -> tuple[list[int], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * writer + i)
    kv = [torch.stack([torch.randn(N, HKV, D, generator=g), torch.randn(N, HKV, D, generator=g)]) for _ in range(L)]
    return [(writer * 7 + i + t) % 50000 for t in range(N)], kv


def load(path) -> tuple[int, int]:
    """Load the session at path; assert it is exactly one writer's save i. Returns (writer, i)."""
    body = read_manifest(path)
    ids = read_tokens(path, body)
    cache = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, capacity=N)
    restore_kv(path, body, cache)
    want_ids, want_kv = expected(body["writer"], body["save"])
    assert ids == want_ids
    for layer in range(L):
        assert torch.equal(cache.export_kv(layer, 0, N), want_kv[layer])
    return body["writer"], body["save"]


@pytest.mark.slow
def test_two_processes_saving_one_session_leave_one_complete_save(tmp_path):
    path, saves = tmp_path / "session", 25
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), str(saves)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for w in (1, 2)]
    loaded, refused = set(), []
    (tmp_path / "session.go").touch()
    while any(p.poll() is None for p in procs):  # read while they write: a load is right or refused, never wrong
        try:
            loaded.add(load(path))
        except TierKVError as e:  # before the first save lands, and a read that straddles a swap
            refused.append(str(e))
        time.sleep(0.01)
    outs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    final = load(path)  # after both: exactly one writer's last save, complete
    assert final in {(1, saves - 1), (2, saves - 1)}
    leftovers = sorted(f.name for f in tmp_path.iterdir())
    assert leftovers == ["session", "session.go"]  # no temp or parked directories
    print(f"loads during the race: {len(loaded)} distinct saves read whole, {len(refused)} refused")


@pytest.mark.slow
def test_two_chats_on_one_llm_never_see_each_others_tokens(smol):
    """Interleaved turns of two chats on one LLM give exactly the replies each gets alone."""
    contexts = {"a": "The secret word is apple. Answer with the secret word only.",
                "b": "The secret word is banana. Answer with the secret word only."}
    turns = ["What is the secret word?", "Say it again."]
    alone = {}
    for name, context in contexts.items():
        chat = smol.chat(context=context, max_new_tokens=5, progress=False)
        alone[name] = [chat.send(t) for t in turns]
        chat.close()
    both = {name: smol.chat(context=context, max_new_tokens=5, progress=False) for name, context in contexts.items()}
    together = {name: [] for name in contexts}
    for t in turns:
        for name, chat in both.items():
            together[name].append(chat.send(t))
    for chat in both.values():
        chat.close()
    assert together == alone
    assert alone["a"] != alone["b"]  # the contexts differ enough for a leak to show
