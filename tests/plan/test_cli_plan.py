"""`tierkv plan` through the real CLI in a subprocess, and the budget checks behind its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest
import torch

from tierkv.errors import BudgetError, ConfigError
from tierkv.plan.budgets import check_gpu_budget, parse_budgets


def tierkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierkv", *args], capture_output=True, text=True, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.slow
def test_plan_json_is_parseable_and_matches_the_planner(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERKV_CACHE_DIR", str(tmp_path))  # no cached probe: documented default bandwidths
    r = tierkv("plan", "llama3.1-8b", "--gpu-budget", "12GiB", "--cpu-budget", "10GiB", "--context", "32768", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    # the 12 GiB / 32K case of test_planner's CPU-layer test: 22 resident, 10 streamed, embedding on the host
    assert doc["layers"].count("gpu") == 22 and doc["layers"].count("host") == 10
    assert doc["embedding"] == "host" and doc["attention"] == "sparse"
    assert doc["gpu_bytes"]["total"] <= 12 * 1024**3
    assert doc["predicted"]["bound"] == "link" and doc["predicted"]["ms_per_token"] > 0
    assert sum(g["last"] - g["first"] + 1 for g in doc["groups"]) == 32
    assert doc["bandwidths"]["source"]["link"].startswith("default")


@pytest.mark.slow
def test_plan_table_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERKV_CACHE_DIR", str(tmp_path))
    r = tierkv("plan", "qwen2.5-7b", "--gpu-budget", "12GiB", "--cpu-budget", "10GiB", "--context", "32K")
    assert r.returncode == 0, r.stderr
    assert "streamed from pinned host memory" in r.stdout and "link-bound" in r.stdout
    one_line_error(tierkv("plan", "llama3.1-8b", "--gpu-budget", "12 gigs", "--cpu-budget", "8GiB"),
                   "gpu_budget='12 gigs' is not a size")
    one_line_error(tierkv("plan", "llama3.1-8b", "--gpu-budget", "12GiB", "--cpu-budget", "lots"),
                   "cpu_budget='lots' is not a size")
    one_line_error(tierkv("plan", "llama3.1-8b", "--gpu-budget", "12GiB", "--cpu-budget", "1000TiB"),
                   "cpu_budget=1000.00 TiB is more than")
    one_line_error(tierkv("plan", "llama3.1-8b", "--gpu-budget", "1GiB", "--cpu-budget", "4GiB",
                          "--context", "131072"), "does not fit", "gpu_budget=2.76 GiB")
    one_line_error(tierkv("plan", "no-such-model", "--gpu-budget", "12GiB", "--cpu-budget", "4GiB"),
                   "no-such-model", "llama3.1-8b")


def test_bad_budget_strings():
    for gpu, cpu in (("12XB", None), (None, "-3GiB"), ("abc", "1GiB")):
        with pytest.raises(ConfigError) as err:
            parse_budgets(gpu, cpu)
        assert "\n" not in str(err.value) and "budget" in str(err.value)


def test_cpu_budget_above_available_memory():
    avail = psutil.virtual_memory().available
    with pytest.raises(BudgetError, match="cpu_budget="):
        parse_budgets(None, str(2 * avail))
    assert parse_budgets(None, str(2 * avail), check=False) == (None, 2 * avail)
    assert parse_budgets("1GiB", "1MiB") == (1024**3, 1024**2)


def test_gpu_budget_above_device_memory(monkeypatch):
    # No GPU on the CI machine: stand in a device of 16 GiB (the real check runs wherever CUDA is visible).
    class Props:
        name, total_memory = "Test GPU", 16 * 1024**3

    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: Props)
    total = torch.cuda.get_device_properties(0).total_memory
    check_gpu_budget(total)
    with pytest.raises(BudgetError, match="gpu_budget=.* is more than"):
        check_gpu_budget(total + 1)


@pytest.mark.parametrize("flags,tokens", [((), 2048), (("--budget-floor-tokens", "0"), 1024),
                                          (("--token-budget", "0.25", "--budget-floor-tokens", "0"), 2048),
                                          (("--token-budget", "512"), 512)])
def test_plan_token_budget_flags(flags, tokens):
    from click.testing import CliRunner

    from tierkv.cli.plan import command

    r = CliRunner().invoke(command, ["llama3.1-8b", "--gpu-budget", "24GiB", "--cpu-budget", "64GiB", "--context",
                                     "8K", "--attention", "sparse", "--any-machine", "--json", *flags])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["token_budget_tokens"] == tokens
