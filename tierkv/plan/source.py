"""The ModelConfig of what `tierkv plan MODEL` names: a built-in shape, a model folder, a config.json or a GGUF.

Only configuration is read: a GGUF's metadata through transformers (no tensor is converted), a config.json
through transformers' config class for its model_type. transformers is imported on use.
"""

from __future__ import annotations

import json
from pathlib import Path

from tierkv.errors import ModelNotFoundError, UnsupportedModelError
from tierkv.models.config import ModelConfig
from tierkv.models.shapes import SHAPES, shape_config


def model_config_for(model: str) -> ModelConfig:
    """ModelConfig of a shape name, a folder holding config.json, a config.json file or a .gguf file."""
    if model in SHAPES:
        return shape_config(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{model!r} has no config.json; give a model folder, a config.json, a .gguf file "
                                     f"or a shape ({', '.join(SHAPES)})")
        return _from_json(path / "config.json", name=path.name)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_gguf(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return _from_json(path, name=path.parent.name)
    raise ModelNotFoundError(f"model {model!r} is not a folder, config.json, .gguf file or built-in shape; built-in "
                             f"shapes are {', '.join(SHAPES)}")


def _from_json(path: Path, name: str) -> ModelConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{str(path)!r} is not readable JSON ({e}); give a Hugging Face config.json") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UnsupportedModelError(f"{str(path)!r} has no model_type; give a Hugging Face config.json")
    from transformers import AutoConfig

    model_type = raw.pop("model_type")
    try:
        hf = AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedModelError(f"{str(path)!r}: model_type {model_type!r} cannot be read ({e}); tierkv plans "
                                    f"llama, qwen2 and mistral models") from None
    return ModelConfig.from_hf(hf, name=name)


def _from_gguf(path: Path) -> ModelConfig:
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise UnsupportedModelError(f"cannot read the GGUF metadata of {str(path)!r} ({e}); give a llama, qwen2 or "
                                    f"mistral GGUF") from None
    return ModelConfig.from_hf(hf, name=path.stem)
