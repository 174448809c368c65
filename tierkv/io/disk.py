"""Disk backends for the KV disk tier: kvikio CuFile ('kvikio-gds' / 'kvikio-compat') or POSIX pread/pwrite.

`open_backend` picks one once per store, with a tiny write/read probe, because kvikio can import on a machine
without a CUDA driver and then fail every read. Buffers are host byte arrays (numpy uint8 views of pinned tensors).
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tierkv.errors import ConfigError

BACKENDS = ("auto", "kvikio", "posix")


class DiskFile(ABC):
    """One open file with positional, whole-buffer reads and writes. Blocking; safe from several threads.

    Every file also holds a POSIX descriptor (`fd`): growing the file goes through it, so a run directory removed
    or replaced mid-run leaves the open file working (the kernel keeps the inode until close)."""

    name: str
    fd: int
    fallback_reason = ""  # why a kvikio file now runs on POSIX ('' while it runs as chosen)

    @abstractmethod
    def pwrite(self, buf: np.ndarray, offset: int) -> None:
        """Write all of buf (uint8, contiguous) at offset; raises OSError (ENOSPC, EFBIG, ...). Blocks."""

    @abstractmethod
    def pread(self, buf: np.ndarray, offset: int) -> None:
        """Fill all of buf from offset; raises OSError on a short read. Mutates buf; blocks."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reserve(self, size: int) -> None:
        """Make the file at least `size` bytes with blocks allocated, so a full disk fails here. Blocks."""
        if os.fstat(self.fd).st_size >= size:
            return
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                raise
            os.ftruncate(self.fd, size)  # filesystems without fallocate (tmpfs on some kernels)


def posix_pwrite(fd: int, buf: np.ndarray, offset: int) -> None:
    """Write all of buf at offset on fd (a write that hits a size limit is short first, then fails with EFBIG)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def posix_pread(fd: int, buf: np.ndarray, offset: int, path: str) -> None:
    """Fill all of buf from offset of fd; OSError(EIO) naming path when the file ends first (a short read)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short read: the file ends before offset {offset + done} (truncated?) of {path}")
        done += n


class PosixFile(DiskFile):
    """os.pwrite/os.pread on one descriptor (the kernel page cache in between)."""

    name = "posix"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def pwrite(self, buf: np.ndarray, offset: int) -> None:
        posix_pwrite(self.fd, buf, offset)

    def pread(self, buf: np.ndarray, offset: int) -> None:
        posix_pread(self.fd, buf, offset, self.path)


class KvikioFile(DiskFile):
    """kvikio.CuFile: GPUDirect Storage where the system has it, kvikio's own POSIX threads elsewhere.

    With fallback (the disk tier), a kvikio read or write that fails is redone with POSIX on the same file; when
    POSIX succeeds, kvikio is the broken part, so the file stays on POSIX from then on and `name` becomes
    'posix-fallback' (a named mode in stats). Without fallback (the backend probe) kvikio's error is raised.
    """

    def __init__(self, path: str | os.PathLike, kvikio_mod, name: str, *, fallback: bool = True) -> None:
        self.path, self.name, self._kvikio, self._fallback = str(path), name, kvikio_mod, fallback
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # a missing directory fails here, as POSIX
        self.f = None
        try:
            self.f = kvikio_mod.CuFile(self.path, "r+")
        except Exception as e:  # noqa: BLE001 - e.g. a cuFile handle refused for this file
            if not fallback:
                self.close()
                raise
            self._give_up_kvikio("open", e)

    def _give_up_kvikio(self, what: str, error: Exception) -> None:
        text = (error.strerror if isinstance(error, OSError) and error.strerror else str(error)) or type(error).__name__
        text = text.splitlines()[0][-120:]
        self.fallback_reason, self.name = f"kvikio {what} failed: {text}", "posix-fallback"

    def pwrite(self, buf: np.ndarray, offset: int) -> None:
        if self.f is not None and not self.fallback_reason:
            try:
                return self._kvikio_io(self.f.pwrite, buf, offset, errno.ENOSPC, "write")
            except Exception as e:  # noqa: BLE001 - any kvikio failure is retried on POSIX below
                if not self._fallback:
                    raise
                posix_pwrite(self.fd, buf, offset)  # a full disk fails here too, with its real errno
                return self._give_up_kvikio("write", e)
        posix_pwrite(self.fd, buf, offset)

    def pread(self, buf: np.ndarray, offset: int) -> None:
        if self.f is not None and not self.fallback_reason:
            try:
                return self._kvikio_io(self.f.pread, buf, offset, errno.EIO, "read")
            except Exception as e:  # noqa: BLE001
                if not self._fallback:
                    raise
                posix_pread(self.fd, buf, offset, self.path)  # a short read fails here too
                return self._give_up_kvikio("read", e)
        posix_pread(self.fd, buf, offset, self.path)

    @staticmethod
    def _kvikio_io(call, buf: np.ndarray, offset: int, short_errno: int, what: str) -> None:
        try:
            n = call(buf, buf.nbytes, offset).get()
        except RuntimeError as e:  # kvikio reports errno failures as RuntimeError
            raise OSError(_errno_of(str(e)), str(e)) from e
        if n != buf.nbytes:
            raise OSError(short_errno, f"short {what} ({n} of {buf.nbytes} bytes) at offset {offset}")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        super().close()


def _errno_of(message: str) -> int:
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        if os.strerror(code).lower() in message.lower():
            return code
    return errno.EIO


@dataclass(frozen=True)
class BackendChoice:
    """The backend a disk store uses and why (shown in stats and `tierkv info`)."""

    name: str  # 'kvikio-gds' | 'kvikio-compat' | 'posix'
    reason: str
    threads: int


def choose_backend(directory: str | os.PathLike, prefer: str = "auto", threads: int = 1) -> tuple[BackendChoice, object]:
    """Pick the disk backend once: kvikio if importable and a probe write/read in `directory` works, else POSIX.

    Returns the choice and the kvikio module (None for POSIX). Sets kvikio's thread count (process-wide).
    prefer='kvikio' raises ConfigError when kvikio does not work; 'posix' skips the probe. Blocks briefly.
    """
    if prefer not in BACKENDS:
        raise ConfigError(f"disk backend {prefer!r} is unknown; use one of {', '.join(BACKENDS)}")
    if prefer == "posix":
        return BackendChoice("posix", "asked for", 1), None
    kvikio, why = _probe_kvikio(Path(directory), threads)
    if kvikio is None:
        if prefer == "kvikio":
            raise ConfigError(f"disk backend 'kvikio' does not work here ({why}); install kvikio-cu13 on a CUDA "
                              f"machine or use the 'posix' backend")
        return BackendChoice("posix", why, 1), None
    name = "kvikio-compat" if kvikio.defaults.is_compat_mode_preferred() else "kvikio-gds"
    return BackendChoice(name, "probe passed", threads), kvikio


def _probe_kvikio(directory: Path, threads: int) -> tuple[object, str]:
    """(kvikio module, '') when kvikio imports and a 4 KiB write/read round-trips; else (None, reason)."""
    try:
        import kvikio  # noqa: PLC0415 - optional dependency
        import kvikio.defaults  # noqa: PLC0415
    except Exception as e:  # ImportError, or a missing libcufile raised while importing
        return None, f"kvikio not importable: {type(e).__name__}"
    probe = directory / f".kvikio-probe-{os.getpid()}"
    try:
        _set_threads(kvikio, threads)
        data = np.arange(4096, dtype=np.uint8)
        back = np.zeros_like(data)
        f = KvikioFile(probe, kvikio, "probe", fallback=False)
        try:
            f.pwrite(data, 0)
            f.pread(back, 0)
        finally:
            f.close()
        if not np.array_equal(data, back):
            return None, "kvikio probe read back different bytes"
        return kvikio, ""
    except Exception as e:  # e.g. 'libcuda.so.1: cannot open shared object file' on a CPU machine
        return None, f"kvikio probe failed: {str(e).splitlines()[0][-120:]}"
    finally:
        probe.unlink(missing_ok=True)


def _set_threads(kvikio, threads: int) -> None:
    if hasattr(kvikio.defaults, "set"):
        kvikio.defaults.set("num_threads", int(threads))
    else:  # kvikio < 25.02
        kvikio.defaults.num_threads_reset(int(threads))


def open_file(path: str | os.PathLike, choice: BackendChoice, kvikio_mod) -> DiskFile:
    """Open (creating) one data file with the chosen backend. A kvikio file that kvikio cannot open runs on POSIX
    as 'posix-fallback' (see KvikioFile)."""
    if choice.name == "posix":
        return PosixFile(path)
    return KvikioFile(path, kvikio_mod, choice.name)
