"""StepClock: per-step decode times with device syncs, callbacks at the measured window's edges, and an
optional torch profiler over the steps after it (so profiling never distorts the measured steps).
"""

from __future__ import annotations

from typing import Callable

import torch

from tierkv.bench.common import now, summarize, sync
from tierkv.bench.stages import stage_times


class StepClock:
    """Call `tick(k)` at the boundary before step k (k = 0 .. total_steps). Steps [warmup, warmup+steps) are
    measured; the `profile_steps` after them run under torch.profiler when profile_steps > 0."""

    def __init__(self, device: torch.device, warmup: int, steps: int, profile_steps: int = 0,
                 on_start: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None) -> None:
        self.device, self.warmup, self.steps, self.profile_steps = device, warmup, steps, profile_steps
        self.on_start, self.on_end = on_start, on_end
        self.ticks: list[float] = []
        self.profile_table: str | None = None
        self.profile_stages: dict[str, float] | None = None  # ms per step by stage (CUDA)
        self._prof = None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + self.profile_steps

    def tick(self, k: int) -> None:
        """Record the boundary before step k (syncs the device first). Blocks."""
        sync(self.device)
        if k == self.warmup and self.on_start:
            self.on_start()  # before the timestamp, so its cost is not billed to a measured step
        self.ticks.append(now())
        if k == self.warmup + self.steps:
            if self.on_end:
                self.on_end()
            if self.profile_steps:
                self._start_profiler()
        if k == self.total_steps and self._prof is not None:
            self._stop_profiler()

    def step_ms(self) -> list[float]:
        """Milliseconds of each measured step."""
        t, w = self.ticks, self.warmup
        return [1000.0 * (t[i + 1] - t[i]) for i in range(w, min(w + self.steps, len(t) - 1))]

    def summary(self) -> dict:
        """{'min', 'median', 'max'} ms of the measured steps."""
        return summarize(self.step_ms())

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=acts)
        self._prof.start()

    def _stop_profiler(self) -> None:
        sync(self.device)
        self._prof.stop()
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        events = self._prof.key_averages()
        self.profile_table = events.table(sort_by=key, row_limit=15)
        if self.device.type == "cuda":
            self.profile_stages = stage_times(events, self.profile_steps)
        self._prof = None
