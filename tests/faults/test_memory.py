"""Memory faults: pinning refused by the locked-memory limit, and running out of memory in prefill or a step.

Pinning exists only with CUDA, so on the CPU the fallback decision itself is tested (a real RLIMIT_MEMLOCK value
read in a subprocess that lowered it); the CUDA test lowers the limit for real. Out of memory is provoked for real:
on the CPU with RLIMIT_AS in a subprocess, on the GPU with torch.cuda.set_per_process_memory_fraction.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import tierkv
from tierkv.errors import BudgetError
from tierkv.io.pinned import unpinned_fallback
from tierkv.oom import DeviceMemoryError

SHORT = [i % 500 for i in range(100)]

LOW_MEMLOCK = textwrap.dedent("""
    import json, resource
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))
    from tierkv.io.pinned import memlock_limit
    print(json.dumps(memlock_limit()))
""")


@pytest.mark.slow
def test_a_failed_pin_falls_back_first_and_stops_when_growing_naming_the_limit():
    res = subprocess.run([sys.executable, "-c", LOW_MEMLOCK], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    limit = json.loads(res.stdout)
    assert limit == 64 * 1024
    error = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    note = unpinned_fallback(64 * 1024**2, error, growing=False, limit=limit)
    assert "RLIMIT_MEMLOCK=64.00 KiB" in note and "pageable" in note and "\n" not in note
    with pytest.raises(BudgetError, match=r"RLIMIT_MEMLOCK=64.00 KiB; raise it \(ulimit -l\) or lower cpu_budget"):
        unpinned_fallback(64 * 1024**2, error, growing=True, limit=limit)
    assert "RLIMIT_MEMLOCK=unlimited" in unpinned_fallback(4096, error, growing=False, limit=None)


CPU_OOM = textwrap.dedent("""
    import json, resource
    import tierkv
    llm = tierkv.load("llama-tiny", device="cpu")
    short = [i % 500 for i in range(100)]
    before = list(llm.stream_ids(short, max_new_tokens=8))
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 300 * 1024**2, resource.RLIM_INFINITY))  # 300 MiB more, at most
    err = None
    try:  # a 1M-token prompt: its K/V alone is 512 MiB
        list(llm.stream_ids([i % 500 for i in range(1_000_000)], max_new_tokens=8))
    except tierkv.TierKVError as e:
        err = [type(e).__name__, str(e)]
    after = list(llm.stream_ids(short, max_new_tokens=8))  # the same LLM, in the same process
    print(json.dumps({"err": err, "same": before == after}))
""")


@pytest.mark.slow
def test_out_of_memory_in_prefill_names_the_budget_and_the_llm_runs_again():
    res = subprocess.run([sys.executable, "-c", CPU_OOM], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["err"][0] == "DeviceMemoryError" and "\n" not in r["err"][1]
    assert "lower kv_gpu_budget" in r["err"][1] and "shorten the prompt" in r["err"][1]
    assert r["same"]


@pytest.mark.cuda
def test_cuda_out_of_memory_names_the_budget_and_the_llm_runs_again():
    llm = tierkv.load("llama-tiny", device="cuda", dtype="fp32", graph=False)
    want = list(llm.stream_ids(SHORT, max_new_tokens=8))
    total = torch.cuda.get_device_properties(0).total_memory
    llm.tier = llm.tier.replace(kv_gpu_budget=2 * total, cpu_budget="64MiB")  # device slots are allocated up front
    with pytest.raises(DeviceMemoryError, match=r"out of memory on the GPU .*lower kv_gpu_budget \(now"):
        list(llm.stream_ids(SHORT, max_new_tokens=8))
    llm.tier = llm.tier.replace(kv_gpu_budget="64MiB")  # a retry with a smaller budget, same process
    assert list(llm.stream_ids(SHORT, max_new_tokens=8)) == want
    llm.tier = llm.tier.replace(kv_gpu_budget=None, cpu_budget=None)
    cap = (torch.cuda.memory_allocated() + 256 * 1024**2) / total  # 256 MiB above what the weights hold
    torch.cuda.set_per_process_memory_fraction(cap)
    try:
        with pytest.raises(DeviceMemoryError, match="shorten the prompt"):  # 1M tokens: 512 MiB of K/V
            list(llm.stream_ids([i % 500 for i in range(1_000_000)], max_new_tokens=8))
        assert list(llm.stream_ids(SHORT, max_new_tokens=8)) == want  # a shorter prompt, same process
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


LOW_MEMLOCK_CUDA = textwrap.dedent("""
    import json, resource
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
    from tierkv.kv.storage.host import HostPool
    pool = HostPool(64 * 1024, 4096)  # 256 MiB budget; its first 64 MiB block is pinned (or not) at once
    print(json.dumps({"mode": pool.mode, "note": pool.pin_note}))
""")


@pytest.mark.cuda
def test_cuda_pinning_under_a_tiny_memlock_limit_falls_back_and_says_so():
    res = subprocess.run([sys.executable, "-c", LOW_MEMLOCK_CUDA], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if r["mode"] == "pinned":
        pytest.skip("the driver pinned 64 MiB under a 64 KiB RLIMIT_MEMLOCK (root: CAP_IPC_LOCK ignores the limit)")
    assert r["mode"] == "pageable-fallback" and "RLIMIT_MEMLOCK=64.00 KiB" in r["note"]
