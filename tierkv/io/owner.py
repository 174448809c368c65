"""Whether the process that owns a file is still running (files named with their owner's pid)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True when a process with this pid exists (ours included), also one we may not signal. Does not block."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
