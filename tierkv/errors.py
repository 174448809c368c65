"""Errors a user can cause. Each message names the bad input and the fix in one line.

The CLI prints `TierKVError` messages without a traceback and exits non-zero.
"""


class TierKVError(Exception):
    """Base of every error tierkv raises on purpose."""


class ModelNotFoundError(TierKVError):
    """A model path or default model that does not exist or is not a model."""


class UnsupportedModelError(TierKVError):
    """An architecture or checkpoint layout tierkv cannot run."""


class ContextTooLongError(TierKVError):
    """A prompt longer than the model's context window."""


class ConfigError(TierKVError):
    """A bad setting: size string, device, dtype, budget."""


class BudgetError(ConfigError):
    """A tier budget that cannot hold what must live there."""


class StorageError(TierKVError):
    """Disk-tier or session storage failed (disk full, unwritable directory)."""


class IntegrityError(StorageError):
    """Stored data failed its checksum or format check."""
