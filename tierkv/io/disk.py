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
    """One open file with positional, whole-buffer reads and writes. Blocking; safe from several threads."""

    name: str

    @abstractmethod
    def pwrite(self, buf: np.ndarray, offset: int) -> None:
        """Write all of buf (uint8, contiguous) at offset; raises OSError (ENOSPC, EFBIG, ...). Blocks."""

    @abstractmethod
    def pread(self, buf: np.ndarray, offset: int) -> None:
        """Fill all of buf from offset; raises OSError on a short read. Mutates buf; blocks."""

    @abstractmethod
    def close(self) -> None: ...

    def reserve(self, size: int) -> None:
        """Make the file at least `size` bytes with blocks allocated, so a full disk fails here. Blocks."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size >= size:
                return
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                    raise
                os.ftruncate(fd, size)  # filesystems without fallocate (tmpfs on some kernels)
        finally:
            os.close(fd)


class PosixFile(DiskFile):
    """os.pwrite/os.pread on one descriptor (the kernel page cache in between)."""

    name = "posix"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def pwrite(self, buf: np.ndarray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):  # a write that hits a size limit is short first, then fails with EFBIG
            done += os.pwrite(self.fd, view[done:], offset + done)

    def pread(self, buf: np.ndarray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"short read at offset {offset + done} of {self.path}")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvikioFile(DiskFile):
    """kvikio.CuFile: GPUDirect Storage where the system has it, kvikio's own POSIX threads elsewhere."""

    def __init__(self, path: str | os.PathLike, kvikio_mod, name: str) -> None:
        self.path, self.name, self._kvikio = str(path), name, kvikio_mod
        if not os.path.exists(self.path):
            open(self.path, "wb").close()
        self.f = kvikio_mod.CuFile(self.path, "r+")

    def pwrite(self, buf: np.ndarray, offset: int) -> None:
        try:
            n = self.f.pwrite(buf, buf.nbytes, offset).get()
        except RuntimeError as e:  # kvikio reports errno failures as RuntimeError
            raise OSError(_errno_of(str(e)), str(e)) from e
        if n != buf.nbytes:
            raise OSError(errno.ENOSPC, f"short write ({n} of {buf.nbytes} bytes) at offset {offset}")

    def pread(self, buf: np.ndarray, offset: int) -> None:
        try:
            n = self.f.pread(buf, buf.nbytes, offset).get()
        except RuntimeError as e:
            raise OSError(_errno_of(str(e)), str(e)) from e
        if n != buf.nbytes:
            raise OSError(errno.EIO, f"short read ({n} of {buf.nbytes} bytes) at offset {offset}")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


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
        f = KvikioFile(probe, kvikio, "probe")
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
    """Open (creating) one data file with the chosen backend."""
    if choice.name == "posix":
        return PosixFile(path)
    return KvikioFile(path, kvikio_mod, choice.name)
