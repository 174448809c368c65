"""The decode step captured once as a CUDA graph and replayed for every token.

Static buffers hold the input token and the logits; the cache's device-side position advances inside
the graph, so a replay needs no host work beyond launching it.
"""

from __future__ import annotations

import torch

from tierkv.kv.static import StaticKVCache
from tierkv.models.llama import LlamaModel


class GraphStep:
    """Callable like engine.eager_step: (token (1,), position) -> logits (1, V), replaying one graph."""

    def __init__(self, model: LlamaModel, cache: StaticKVCache, warmup: int = 2) -> None:
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, dtype=torch.long, device=model.device)
        model.rope.ensure(cache.capacity + 1)
        saved_len = cache.seq_len
        saved_pos = cache.pos.clone()
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):  # the warm-up writes the slot at `pos`, which the real step rewrites
                model.forward(self.token, cache.pos, cache)
                cache.pos.copy_(saved_pos)
        torch.cuda.current_stream(model.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.forward(self.token, cache.pos, cache)  # (1, V)
        cache.seq_len = saved_len
        cache.pos.copy_(saved_pos)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(token)
        self.graph.replay()
        self.cache.seq_len += 1
        return self.logits
