"""PlanInputs: everything the planner decides from, as one frozen dataclass (no weights, no device)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tierkv.config import ATTENTION_MODES, TierConfig
from tierkv.errors import ConfigError
from tierkv.kv.sparse.model_defaults import with_model_defaults
from tierkv.models.config import ModelConfig
from tierkv.plan.bandwidth import Bandwidths, default_bandwidths
from tierkv.plan.sizes import SparseShape

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}


def default_sparse_shape(model: ModelConfig | None = None) -> SparseShape:
    """The sparse cache's sizes as TierConfig's defaults set them, for `model` as tierkv.load gives them (narrow
    keys: kv/sparse/model_defaults.py)."""
    t = TierConfig() if model is None else with_model_defaults(TierConfig(), model, {})
    return SparseShape(t.rank, t.score_rank, t.chunk_size, t.sink_tokens, t.window_tokens, t.prefill_chunk)


@dataclass(frozen=True)
class PlanInputs:
    """A planning question. Budgets are bytes. gpu_budget covers everything on the GPU (weights, KV, shadows and
    index, staging slots, activations); cpu_budget covers host memory (pinned weight blocks, CPU-computed layers,
    the host KV pool, the host embedding); disk_budget is what the disk may hold (0: no disk tier).

    attention None lets the planner choose; token_budget and budget_floor_tokens are TierConfig's (tokens, or a
    fraction of the context attending at least budget_floor_tokens).
    layer_windows: per-layer sliding window (None entries: full attention); None takes the config's own (ModelConfig.window).
    """

    model: ModelConfig
    context: int
    gpu_budget: int
    cpu_budget: int
    disk_budget: int = 0
    dtype: str = "bf16"
    attention: str | None = None
    token_budget: int | float = TierConfig().token_budget
    budget_floor_tokens: int = TierConfig().budget_floor_tokens
    sparse: SparseShape | None = None  # None: default_sparse_shape(model)
    bandwidths: Bandwidths = field(default_factory=default_bandwidths)
    layer_windows: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.sparse is None:
            object.__setattr__(self, "sparse", default_sparse_shape(self.model))
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"dtype {self.dtype!r} is unknown; use bf16, fp16 or fp32")
        if self.attention is not None and self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention={self.attention!r} is unknown; use one of {', '.join(ATTENTION_MODES)}")
        if not isinstance(self.context, int) or self.context < 1:
            raise ConfigError(f"context={self.context!r} must be a positive number of tokens")
        for name in ("gpu_budget", "cpu_budget", "disk_budget"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r} must be a byte count >= 0")
        windows = self.layer_windows
        if windows is not None and len(windows) != self.model.num_layers:
            raise ConfigError(f"layer_windows has {len(windows)} entries for {self.model.num_layers} layers; "
                              "give one per layer (None for full attention)")
        self._budget_tier()  # validates token_budget and budget_floor_tokens the way the runtime does

    @property
    def elem_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def _budget_tier(self) -> TierConfig:
        """The runtime's settings of the token budget (its other fields at their defaults)."""
        return TierConfig(token_budget=self.token_budget, budget_floor_tokens=self.budget_floor_tokens)

    def budget_tokens(self) -> int:
        """Tokens a sparse step attends to at this context (TierConfig.budget_tokens), at most the context."""
        return min(self.context, self._budget_tier().budget_tokens(self.context))
