"""Assemble a LlamaModel from a checkpoint (Hugging Face tensor names) or from random weights of a shape."""

from __future__ import annotations

import dataclasses
import sys

from typing import Callable

import torch
from tqdm import tqdm

from tierkv.models.config import ModelConfig
from tierkv.models.llama import LayerWeights, LlamaModel
from tierkv.weights.store import LayerPlacer

GetTensor = Callable[[str], torch.Tensor]


def build_model(cfg: ModelConfig, get: GetTensor, *, progress: bool = False, placer: LayerPlacer | None = None,
                get_at: Callable[[str, torch.device], torch.Tensor] | None = None) -> LlamaModel:
    """Fetch each tensor by its HF name through `get` (already cast and on the device) and fuse projections.
    With a placer (tierkv/weights/store.py), layer i's tensors load through get_at(name, placer.device_for(i))
    and are placed (packed, spilled) as each layer loads, so host memory holds one unplaced layer at a time."""
    bar = tqdm(range(cfg.num_layers), desc="loading layers", unit="layer", disable=not (progress and sys.stderr.isatty()),
               leave=False)
    layers = []
    for i in bar:
        if placer is None:
            layers.append(_layer(cfg, get, i))
        else:
            g = placer.getter(i, get_at, lambda fn, i=i: _layer(cfg, fn, i))
            layers.append(placer.place(i, _layer(cfg, g, i)))
    embed = get("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight")
    model = LlamaModel(cfg, embed, layers, _norm(cfg, get, "model.norm.weight"), lm_head)
    if placer is not None:
        model.attach_weights(placer.finish(layers))
    return model


def _norm(cfg: ModelConfig, get: GetTensor, name: str) -> torch.Tensor:
    """An RMSNorm weight as the forward multiplies it (Gemma stores w and scales by 1 + w)."""
    w = get(name)
    return w + cfg.arch.norm_weight_offset if cfg.arch.norm_weight_offset else w


def _layer(cfg: ModelConfig, get: GetTensor, i: int) -> LayerWeights:
    """Layer i's tensors under the HF names of cfg's architecture."""
    a, p = cfg.arch, f"model.layers.{i}."
    qkv = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
    bias = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if cfg.attention_bias else None
    gate_up = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
    # Llama names the pre-MLP norm post_attention_layernorm; Gemma 3 uses that name for the norm on the attention
    # output and calls the pre-MLP one pre_feedforward_layernorm
    pre_mlp = "pre_feedforward_layernorm" if a.sandwich_norms else "post_attention_layernorm"
    return LayerWeights(
        input_norm=_norm(cfg, get, p + "input_layernorm.weight"), qkv_proj=qkv, qkv_bias=bias,
        o_proj=get(p + "self_attn.o_proj.weight"), pre_mlp_norm=_norm(cfg, get, p + pre_mlp + ".weight"),
        gate_up_proj=gate_up, down_proj=get(p + "mlp.down_proj.weight"),
        q_norm=_norm(cfg, get, p + "self_attn.q_norm.weight") if a.qk_norm else None,
        k_norm=_norm(cfg, get, p + "self_attn.k_norm.weight") if a.qk_norm else None,
        attn_out_norm=_norm(cfg, get, p + "post_attention_layernorm.weight") if a.sandwich_norms else None,
        mlp_out_norm=_norm(cfg, get, p + "post_feedforward_layernorm.weight") if a.sandwich_norms else None,
    )


def _moved_to(layer: LayerWeights, device: torch.device) -> LayerWeights:
    return LayerWeights(**{f.name: None if getattr(layer, f.name) is None else getattr(layer, f.name).to(device)
                           for f in dataclasses.fields(layer)})


def random_model(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0, *,
                 placer: LayerPlacer | None = None, progress: bool = False) -> LlamaModel:
    """A model of cfg's shape with random weights made directly on the device (for benchmarks); with a placer,
    layers that do not stay resident are moved to host memory and placed (packed, spilled) one at a time."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d, hd = cfg.hidden_size, cfg.head_dim

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    a = cfg.arch

    def layer() -> LayerWeights:
        return LayerWeights(
            input_norm=ones(d), qkv_proj=rand(qkv_rows, d), qkv_bias=rand(qkv_rows) if cfg.attention_bias else None,
            o_proj=rand(d, cfg.num_heads * hd), pre_mlp_norm=ones(d),
            gate_up_proj=rand(2 * cfg.intermediate_size, d), down_proj=rand(d, cfg.intermediate_size),
            q_norm=ones(hd) if a.qk_norm else None, k_norm=ones(hd) if a.qk_norm else None,
            attn_out_norm=ones(d) if a.sandwich_norms else None, mlp_out_norm=ones(d) if a.sandwich_norms else None)

    bar = tqdm(range(cfg.num_layers), desc="making layers", unit="layer",
               disable=not (progress and placer is not None and sys.stderr.isatty()), leave=False)
    # every layer is drawn on the device from one generator (the same weights whatever the placement, and fast),
    # then moved where the placer wants it, one layer at a time
    layers = [layer() if placer is None else placer.place(i, _moved_to(layer(), placer.device_for(i))) for i in bar]
    embed = rand(cfg.vocab_size, d, std=1.0)
    lm_head = embed if cfg.tie_word_embeddings else rand(cfg.vocab_size, d)
    model = LlamaModel(cfg, embed, layers, ones(d), lm_head)
    if placer is not None:
        model.attach_weights(placer.finish(layers))
    return model
