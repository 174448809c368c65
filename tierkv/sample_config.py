"""SamplingConfig: how many tokens to generate and how to pick them, validated once for the CLI and the API.

Kept free of torch so the CLI can refuse a bad flag before it imports anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tierkv.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """Generation settings. temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and repeat_penalty 1 are off.

    stop: strings that end generation when they appear in the decoded text (they are not emitted).
    repeat_window: how many recent tokens (prompt included) repeat_penalty looks at.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_window: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, "-n/--max-new-tokens: the number of tokens to generate")
        _check_number("temperature", self.temperature, lambda v: 0 <= v < math.inf, "give 0 (greedy) or more")
        _check_number("top_p", self.top_p, lambda v: 0 < v <= 1,
                      "top_p keeps the most likely tokens up to this mass; give a value in (0, 1] (1 turns it off)")
        _check_int("top_k", self.top_k, 0, "top_k keeps the k most likely tokens (0 turns it off)")
        _check_number("min_p", self.min_p, lambda v: 0 <= v <= 1,
                      "min_p drops tokens below min_p x the top probability; give a value in [0, 1] (0 turns it off)")
        _check_number("repeat_penalty", self.repeat_penalty, lambda v: 0 < v < math.inf,
                      "give a factor > 0 (1 turns it off, 1.1 is common)")
        _check_int("repeat_window", self.repeat_window, 1, "the number of recent tokens the repeat penalty looks at")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop={self.stop!r} must be non-empty strings; give e.g. stop=['\\n\\n']")
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"seed={self.seed!r} is not a non-negative integer; give e.g. seed=1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **options) -> "SamplingConfig":
        """A copy with options (field names) replaced; an unknown name is refused."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise ConfigError(f"unknown generation option {', '.join(unknown)}; choose from {names}")
        return dataclasses.replace(self, **options)


def sampling_config(base: SamplingConfig | None = None, **options) -> SamplingConfig:
    """base (default: SamplingConfig()) with options applied: what generate/stream/Chat accept as keywords."""
    return (base or SamplingConfig()).updated(**options)


def _check_int(name: str, value, lowest: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ConfigError(f"{name}={value!r} must be an integer >= {lowest} ({what})")


def _check_number(name: str, value, ok, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
        raise ConfigError(f"{name}={value!r} is out of range; {fix}")
