"""The decode step captured once as a CUDA graph and replayed for every token.

Static buffers hold the input token and the logits; the cache's device-side position (`pos`) advances inside
the graph, so a replay needs no host work beyond launching it. A cache may ask for an eager step
(`needs_eager()`: a sparse cache fitting or folding its key shadows); the graph is captured at the first step
that does not need one and replayed afterwards, its buffers written in place by the eager steps in between.
A cache may also ask, after a replay, for the step to be redone (`redo_step()`: the sparse cache's disk tier
lacked picked chunks in host memory; it reads them and the step is replayed again, or run eagerly when the
misses were many or persist after REPLAYS_ON_MISS retries). The hooks are kv/interface.GraphHooks.

A step that must capture runs eagerly for real first (that run warms what the recording needs: kernels,
allocator, lazy handles) and records the graph after it; the recording executes nothing, so capturing costs one
eager step plus the recording, not eager warm-up steps that are thrown away.

One GraphStep serves a cache for as long as the cache lives: generate calls and chat turns between its steps
(prefill, truncate) move only values on the device, so the graph replays on. It captures again only when the cache
reallocated a buffer the graph reads (`buffers_epoch`) or the RoPE tables grew; `captures` counts captures.
"""

from __future__ import annotations

import time

import torch

from tierkv.kv.caches.base import KVCache
from tierkv.models.llama import LlamaModel

# replays of a step that missed chunks on disk (each retry first reads what the last one missed) before it runs
# eagerly: on real text a miss is rare and a replay costs far less than an eager step
REPLAYS_ON_MISS = 2


class GraphStep:
    """Callable like engine.eager_step: (token (1,), position) -> logits (1, V), replaying one graph.

    The cache needs `pos` (1,) on the device and `capacity`, and the kv/interface.GraphHooks it inherits.
    """

    def __init__(self, model: LlamaModel, cache: KVCache) -> None:
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, dtype=torch.long, device=model.device)
        self._stream = torch.cuda.Stream(model.device)  # captures run on a side stream, as CUDA requires
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = self.replays = self.captures = 0
        self.capture_s = 0.0  # wall seconds spent in captures (the eager step before each included)
        # capture_s split by phase: the real eager step that precedes a recording, the recording, the sync ending it
        self.capture_phases = {"eager_step_s": 0.0, "record_s": 0.0, "sync_s": 0.0}
        self._captured_for: tuple | None = None  # (buffers_epoch, rope cos, rope sin) the graph was captured with
        model.rope.ensure(cache.capacity + 1)  # tables are never reallocated after capture

    def _capture(self) -> None:
        """Record the step at the cache's current position (nothing runs: position and length are put back)."""
        t1 = time.perf_counter()
        model, cache = self.model, self.cache
        saved_len, saved_pos = cache.seq_len, cache.pos.clone()
        self.graph = torch.cuda.CUDAGraph()
        # capture_begin/end rather than torch.cuda.graph, which first empties the device and pinned-host caching
        # allocators: the next prefill would then allocate everything from the driver again
        main = torch.cuda.current_stream(model.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            self.graph.capture_begin()
            try:
                self.logits = model.forward(self.token, cache.pos, cache)  # (1, V)
            finally:
                self.graph.capture_end()
        main.wait_stream(self._stream)
        self.captures += 1
        self._captured_for = self._inputs()
        cache.seq_len = saved_len
        cache.pos.copy_(saved_pos)
        t2 = time.perf_counter()
        torch.cuda.current_stream(model.device).synchronize()  # once per capture: its time is measured whole
        t3 = time.perf_counter()
        self.capture_s += t3 - t1
        for key, dt in (("record_s", t2 - t1), ("sync_s", t3 - t2)):
            self.capture_phases[key] += dt

    def _inputs(self) -> tuple:
        """What a capture is valid for: the cache's buffer epoch and the RoPE tables (by identity)."""
        rope = self.model.rope
        return self.cache.buffers_epoch, rope.cos, rope.sin

    def _current(self) -> bool:
        mine, now = self._captured_for, self._inputs()
        return mine is not None and mine[0] == now[0] and mine[1] is now[1] and mine[2] is now[2]

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if self.cache.needs_eager():
            self.eager_steps += 1
            return self.model.forward(token.view(1), self.cache.pos, self.cache)
        if not self._current():
            # this step runs eagerly and warms the recording, which follows it where the next step may replay
            t0 = time.perf_counter()
            self.eager_steps += 1
            logits = self.model.forward(token.view(1), self.cache.pos, self.cache)
            if not self.cache.needs_eager():
                dt = time.perf_counter() - t0
                self.capture_s += dt
                self.capture_phases["eager_step_s"] += dt
                self._capture()
            return logits
        self.token.copy_(token)
        for _ in range(1 + REPLAYS_ON_MISS):
            self.cache.before_replay()
            self.graph.replay()
            self.replays += 1
            self.cache.after_replay(1)
            redo = self.cache.redo_step()
            if redo is None:
                return self.logits
            if redo == "eager":
                break
        self.eager_steps += 1  # many misses, or still missing after the retries: the eager step reads each first
        return self.model.forward(token.view(1), self.cache.pos, self.cache)
