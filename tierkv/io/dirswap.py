"""Atomic replacement of a whole directory (session saves): a complete new directory is swapped in for the old.

Concurrent saves to one directory are last-writer-wins: each swaps in its own complete directory, so a reader finds
one whole save (a read racing a swap may find files of two saves: their checksums refuse it, never mixing them).

Linux swaps the two names in one renameat2(RENAME_EXCHANGE) call ('exchange'); elsewhere two renames with the old
directory parked beside ('rename'), which `recover` undoes if a crash fell between them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from tierkv.io.atomic import fsync_dir
from tierkv.io.owner import process_alive

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names a and b atomically; False where the OS or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _parked(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def _rename_onto_nothing(new: Path, dest: Path) -> bool:
    """Rename new to dest when dest is absent (or an empty directory); False when dest holds something. One call,
    no check before it: another process's save may create dest at any moment (then the caller swaps with it)."""
    try:
        os.rename(new, dest)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def swap_in(new: Path, dest: Path) -> str:
    """Make the complete directory `new` appear at `dest`, removing what was there. Blocks. Returns the mode used."""
    if _rename_onto_nothing(new, dest):
        mode = "rename"
    elif _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old directory
        mode = "exchange"
    else:
        parked = _parked(dest)
        shutil.rmtree(parked, ignore_errors=True)
        os.rename(dest, parked)
        os.rename(new, dest)  # a crash before this line leaves `parked`, which recover() puts back
        shutil.rmtree(parked, ignore_errors=True)
        mode = "rename"
    fsync_dir(dest.parent)
    return mode


def recover(dest: Path) -> None:
    """Undo a swap cut between its two renames and delete temp directories of dead saves. Mutates the parent."""
    parked = _parked(dest)
    if parked.exists():
        if dest.exists():
            shutil.rmtree(parked, ignore_errors=True)
        else:
            os.rename(parked, dest)
    if dest.parent.is_dir():
        for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
            pid = tmp.name.rsplit("-", 2)[-2]
            if not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    # our own leftovers are dead: a save in this process is never in flight while another starts
    return pid != os.getpid() and process_alive(pid)
