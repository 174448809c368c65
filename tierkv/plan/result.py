"""What the planner decided: a Plan (placements, memory split, bytes per token, predicted time, reasons)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tierkv.errors import BudgetError

PLACES = ("gpu", "host", "disk", "cpu")
PLACE_WORDS = {"gpu": "resident on the GPU", "host": "streamed from pinned host memory",
               "disk": "streamed from disk", "cpu": "computed on the CPU"}


class PlanDoesNotFitError(BudgetError):
    """No placement fits the budgets; carries the smallest budgets that would (bytes)."""

    def __init__(self, message: str, min_gpu_budget: int, min_cpu_budget: int) -> None:
        super().__init__(message)
        self.min_gpu_budget, self.min_cpu_budget = min_gpu_budget, min_cpu_budget


@dataclass(frozen=True)
class TokenTraffic:
    """Bytes one decode token moves on each path: weights and KV separately."""

    hbm_weights: int = 0  # weights the GPU reads (resident and streamed layers, lm_head)
    hbm_kv: int = 0  # KV, shadows and index the GPU reads from its own memory
    link_weights: int = 0  # streamed layers copied host -> device (disk layers cross it too)
    link_kv: int = 0  # KV read over the link (offloaded chunks, sparse picks)
    disk_weights: int = 0
    disk_kv: int = 0
    cpu_weights: int = 0  # weights of CPU-computed layers, read from host DRAM


@dataclass(frozen=True)
class Timing:
    """Predicted ms/token: max(link, disk, hbm) + cpu (the overlap model in planner.py)."""

    link_ms: float
    disk_ms: float
    hbm_ms: float
    cpu_ms: float

    @property
    def bound(self) -> str:
        """The path that sets the overlapped part ("link", "disk" or "hbm")."""
        return max((self.link_ms, "link"), (self.disk_ms, "disk"), (self.hbm_ms, "hbm"))[1]

    @property
    def ms_per_token(self) -> float:
        return max(self.link_ms, self.disk_ms, self.hbm_ms) + self.cpu_ms


@dataclass(frozen=True)
class Plan:
    """One placement of a model under budgets. Byte maps name their parts; `reasons` explain the choices."""

    model: str
    context: int
    dtype: str
    attention: str
    token_budget_tokens: int
    layers: tuple[str, ...]  # per decoder layer: one of PLACES
    layer_bytes: tuple[int, ...]
    embedding: str  # "gpu" or "host"
    staging_slots: int
    gpu: dict[str, int]  # weights, embedding, lm_head, kv_fixed, kv_pool, staging, activations, workspace
    host: dict[str, int]  # streamed_weights, cpu_weights, embedding, kv, disk_staging
    disk: dict[str, int]  # weights, kv
    traffic: TokenTraffic
    timing: Timing
    budgets: dict[str, int]
    bandwidths: dict = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    def groups(self) -> list[dict]:
        """Runs of consecutive layers with the same placement: first, last, where, bytes moved per token."""
        out: list[dict] = []
        for i, (place, nbytes) in enumerate(zip(self.layers, self.layer_bytes)):
            moved = nbytes if place in ("host", "disk") else 0
            if out and out[-1]["place"] == place:
                g = out[-1]
                g.update(last=i, weight_bytes=g["weight_bytes"] + nbytes,
                         link_bytes_per_token=g["link_bytes_per_token"] + moved)
            else:
                out.append({"first": i, "last": i, "place": place, "where": PLACE_WORDS[place], "weight_bytes": nbytes,
                            "link_bytes_per_token": moved})
        return out

    def count(self, place: str) -> int:
        return sum(p == place for p in self.layers)

    def to_json(self) -> dict:
        t = self.timing
        return {
            "model": self.model, "context": self.context, "dtype": self.dtype, "attention": self.attention,
            "token_budget_tokens": self.token_budget_tokens, "budgets": dict(self.budgets),
            "layers": list(self.layers), "groups": self.groups(), "embedding": self.embedding, "lm_head": "gpu",
            "staging_slots": self.staging_slots, "gpu_bytes": {**self.gpu, "total": sum(self.gpu.values())},
            "host_bytes": {**self.host, "total": sum(self.host.values())},
            "disk_bytes": {**self.disk, "total": sum(self.disk.values())},
            "bytes_per_token": dict(vars(self.traffic)),
            "predicted": {"ms_per_token": t.ms_per_token, "bound": t.bound, "link_ms": t.link_ms,
                          "disk_ms": t.disk_ms, "hbm_ms": t.hbm_ms, "cpu_ms": t.cpu_ms},
            "bandwidths": self.bandwidths, "reasons": list(self.reasons),
        }
