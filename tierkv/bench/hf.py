"""The transformers systems of the decode benchmark: default cache (all on the GPU), offloaded KV cache
(`DynamicCache(offloading=True)`, what `cache_implementation="offloaded"` builds), and accelerate weight offload.

Shapes get a Hugging Face model with random weights made on the device; folders and GGUF load with from_pretrained.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch

from tierkv.bench.clock import StepClock
from tierkv.bench.common import now, sync
from tierkv.bench.floor import kv_bytes, weight_bytes
from tierkv.bench.systems import DecodeSpec, Row, free_memory, peak_memory, random_ids
from tierkv.config import format_size
from tierkv.models.config import ModelConfig
from tierkv.models.shapes import SHAPES

_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def hf_config(cfg: ModelConfig, max_positions: int):
    """A transformers config of the shape, with room for max_positions."""
    import transformers as tf

    cls = getattr(tf, _CONFIG_CLASSES[cfg.model_type])
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              max_position_embeddings=max(cfg.max_position_embeddings, max_positions), rms_norm_eps=cfg.rms_norm_eps,
              rope_parameters={"rope_theta": cfg.rope_theta, **cfg.rope_scaling},
              tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.model_type == "llama":
        kw["attention_bias"] = cfg.attention_bias
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        kw["head_dim"] = cfg.head_dim
    return cls(**kw)


def build_hf(spec: DecodeSpec, cfg: ModelConfig, max_positions: int, device: torch.device | str):
    """(model in eval mode on `device`, its config). Random weights for shapes. Blocks while it builds or loads."""
    from transformers import AutoModelForCausalLM

    if spec.model in SHAPES:
        hf_cfg = hf_config(cfg, max_positions)
        # random weights are drawn on the GPU when the whole model fits there, then moved: transformers'
        # initialisation of an 8B model on the host took minutes, longer than a device call's step
        build_on = device
        if torch.device(device).type == "cpu" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            if weight_bytes(cfg, spec.dtype) < 0.8 * free:
                build_on = "cuda"
        with torch.device(build_on):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=spec.dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
        if build_on != device:
            model = model.to(device)
            torch.cuda.empty_cache()
        return model.eval(), hf_cfg
    from tierkv.models.weights import resolve_model

    folder = str(resolve_model(spec.model))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=spec.dtype).to(device)
    return model.eval(), model.config


def param_bytes(model) -> tuple[int, int]:
    """(all parameter bytes, bytes of parameters resident on a CUDA device)."""
    total = gpu = 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        total += n
        gpu += n if p.device.type == "cuda" else 0
    return total, gpu


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version's forward takes."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def measure_hf(model, hf_cfg, row: Row, spec: DecodeSpec, *, offload: bool) -> None:
    """Chunked prefill of random ids into a DynamicCache, then timed greedy decode steps. Fills row; may raise OOM."""
    from transformers import DynamicCache

    dev, kw = spec.device, cache_kwarg(model)
    cache = DynamicCache(config=hf_cfg, offloading=offload)
    ids = torch.tensor(random_ids(row.context, hf_cfg.vocab_size, spec.seed), device=dev).view(1, -1)  # (1, T)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    clock = StepClock(dev, spec.warmup, spec.steps, 4 if spec.profile else 0)
    with torch.no_grad():
        sync(dev)
        t0 = now()
        for i in range(0, row.context, spec.prefill_chunk):
            out = model(input_ids=ids[:, i:i + spec.prefill_chunk], **{kw: cache}, use_cache=True,
                        logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        sync(dev)
        row.prefill_tok_s = row.context / (now() - t0)
        del out
        for k in range(clock.total_steps):
            clock.tick(k)
            token = model(input_ids=token, **{kw: cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        clock.tick(clock.total_steps)
    row.decode_ms, row.steps, row.profile = clock.summary(), spec.steps, clock.profile_table
    row.peak_memory_bytes, row.memory_kind = peak_memory(dev)
    del cache


def run_hf(system: str, model, hf_cfg, cfg: ModelConfig, context: int, spec: DecodeSpec) -> Row:
    """One transformers row for hf-default or hf-offloaded (model already built on the device)."""
    row = Row(system, context)
    if model is None:
        row.status, row.reason = "unavailable", hf_cfg  # hf_cfg carries the reason here
        return row
    kv_total = kv_bytes(cfg, spec.dtype, context + spec.warmup + spec.steps + 5)
    weights, _ = param_bytes(model)
    if system == "hf-offloaded":
        if spec.device.type != "cuda":
            row.status, row.reason = "unavailable", "needs CUDA: transformers' offloaded cache moves layers with CUDA streams"
            return row
        row.bytes_per_token = {"host->device": float(kv_total), "device->host": float(kv_total)}
    else:
        row.bytes_per_token = {"kv_hbm": float(kv_total)}
        if spec.device.type == "cuda":
            have = torch.cuda.get_device_properties(spec.device).total_memory
            if weights + kv_total > 0.95 * have:
                row.status = "cannot_run"
                row.reason = f"needs {format_size(weights + kv_total)} for weights and KV; the GPU has {format_size(have)}"
                return row
    row.bytes_source = "modelled (its design moves the whole cache each token)" if system == "hf-offloaded" \
        else "modelled (every cached K/V read from device memory)"
    _guarded(row, spec, lambda: measure_hf(model, hf_cfg, row, spec, offload=system == "hf-offloaded"))
    return row


def run_accelerate(cfg: ModelConfig, context: int, spec: DecodeSpec, weights: int) -> Row:
    """transformers + accelerate weight offload, only where the weights do not fit the GPU budget."""
    row = Row("hf-accelerate", context)
    if spec.device.type != "cuda":
        row.status, row.reason = "unavailable", "needs CUDA (weight offload moves weights to the GPU)"
        return row
    if spec.gpu_budget is None or weights + spec.reserve <= spec.gpu_budget:
        row.status, row.reason = "skipped", "the weights fit the GPU budget; see hf-default and hf-offloaded"
        return row
    if importlib.util.find_spec("accelerate") is None:
        row.status, row.reason = "unavailable", "accelerate is not installed (pip install accelerate)"
        return row
    kv_total = kv_bytes(cfg, spec.dtype, context + spec.warmup + spec.steps + 5)
    room = spec.gpu_budget - kv_total - spec.reserve
    if room <= 0:
        row.status, row.reason = "cannot_run", f"the KV cache alone ({format_size(kv_total)}) fills the GPU budget"
        return row
    holder: dict = {}

    def go() -> None:
        from accelerate import dispatch_model, infer_auto_device_map

        model, hf_cfg = build_hf(spec, cfg, context + spec.warmup + spec.steps + 8, "cpu")
        holder["model"] = model
        dmap = infer_auto_device_map(model, max_memory={spec.device.index or 0: room, "cpu": 10**15},
                                     no_split_module_classes=list(model._no_split_modules or []))
        model = holder["model"] = dispatch_model(model, device_map=dmap)
        _, gpu = param_bytes(model)
        row.settings = {"weights_on_gpu_bytes": gpu, "weights_offloaded_bytes": weights - gpu}
        row.bytes_per_token = {"host->device": float(weights - gpu), "kv_hbm": float(kv_total)}
        row.bytes_source = "modelled (offloaded weights cross the link every token)"
        measure_hf(model, hf_cfg, row, spec, offload=False)

    _guarded(row, spec, go)
    holder.clear()
    free_memory(spec.device)
    return row


def _guarded(row: Row, spec: DecodeSpec, fn) -> None:
    """Run fn; an out-of-memory error becomes the row's status instead of ending the benchmark."""
    try:
        fn()
    except torch.cuda.OutOfMemoryError as e:
        row.status, row.reason = "oom", str(e).splitlines()[0][:200]
        row.decode_ms = row.prefill_tok_s = None
    finally:
        free_memory(spec.device)
