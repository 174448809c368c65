"""kvikio failing at import, at open or at read: POSIX takes over, the tokens stay right, and `tierkv info` and the
run's stats say which backend runs and why.

kvikio is not installed here, so each test puts a fake `kvikio` package first on the PYTHONPATH of a subprocess:
that is the real `import kvikio` path failing (or a CuFile failing), not a patched function; the POSIX side that
takes over is the real one.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import tierkv

pytestmark = pytest.mark.slow  # subprocesses importing torch

FAKE_INIT = textwrap.dedent('''
    """A stand-in kvikio: CuFile over plain files; FAKE_KVIKIO_FAIL picks what breaks (import, open, read)."""
    import os
    MODE = os.environ.get("FAKE_KVIKIO_FAIL", "")
    if MODE == "import":
        raise OSError("libcufile.so.0: cannot open shared object file: No such file or directory")
    from kvikio import defaults  # noqa: E402

    class _Done:
        def __init__(self, n):
            self.n = n

        def get(self):
            return self.n

    class CuFile:
        def __init__(self, path, flags):
            self.real = os.path.basename(path) == "kv.bin"  # the backend probe's own file always works
            if self.real and MODE == "open":
                raise RuntimeError("cuFileHandleRegister failed: internal error")
            self.fd = os.open(path, os.O_RDWR)

        def pwrite(self, buf, n, off):
            return _Done(os.pwrite(self.fd, memoryview(buf).cast("B")[:n], off))

        def pread(self, buf, n, off):
            if self.real and MODE == "read":
                raise RuntimeError("cuFileRead failed: device not ready")
            return _Done(os.preadv(self.fd, [memoryview(buf).cast("B")[:n]], off))

        def close(self):
            os.close(self.fd)
''')
FAKE_DEFAULTS = textwrap.dedent('''
    _settings = {"num_threads": 1}

    def set(key, value):
        _settings[key] = value

    def is_compat_mode_preferred():
        return True
''')
RUN = textwrap.dedent('''
    import json, sys
    import tierkv
    from tierkv.cli.info import collect  # what `tierkv info` prints
    llm = tierkv.load("llama-tiny", device="cpu", kv_gpu_budget=12 * 8192, cpu_budget=4 * 8192, disk_dir=sys.argv[1],
                      sink_tokens=32, window_tokens=32)
    toks = list(llm.stream_ids([i % 500 for i in range(400)], max_new_tokens=20))
    kv = llm.stats["kv"]
    print(json.dumps({"tokens": toks, "backend": kv["disk_backend"], "reason": kv["disk_backend_reason"],
                      "disk_chunks": kv["chunks"]["disk"], "info": {k: v for k, v in collect().items()
                                                                     if k.startswith("disk_backend")}}))
''')


@pytest.fixture(scope="module")
def fake_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    (root / "kvikio").mkdir()
    (root / "kvikio" / "__init__.py").write_text(FAKE_INIT)
    (root / "kvikio" / "defaults.py").write_text(FAKE_DEFAULTS)
    return root


@pytest.fixture(scope="module")
def reference():
    return list(tierkv.load("llama-tiny", device="cpu").stream_ids([i % 500 for i in range(400)], max_new_tokens=20))


def run(args: list[str], fake_path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAKE_KVIKIO_FAIL": mode,
           "PYTHONPATH": os.pathsep.join([str(fake_path), os.environ.get("PYTHONPATH", ""), os.getcwd()])}
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return res


@pytest.mark.parametrize("mode,backend,why", [("import", "posix", "kvikio not importable: OSError"),
                                              ("open", "posix-fallback", "kvikio open failed: cuFileHandleRegister"),
                                              ("read", "posix-fallback", "kvikio read failed: cuFileRead")])
def test_posix_takes_over_and_info_and_the_stats_say_so(tmp_path, fake_path, reference, mode, backend, why):
    r = json.loads(run(["-c", RUN, str(tmp_path)], fake_path, mode).stdout.strip().splitlines()[-1])
    assert r["disk_chunks"] > 0 and r["tokens"] == reference
    assert r["backend"] == backend and r["reason"].startswith(why)
    assert list(tmp_path.iterdir()) == []
    info = r["info"]
    if mode == "import":
        assert info["disk_backend"] == "posix" and info["disk_backend_reason"].startswith(why)
        assert "disk_backend_fallback" not in info
    else:  # the probe's own file works: info names kvikio and the fallback a run falls back to
        assert info["disk_backend"] == "kvikio-compat" and "posix-fallback" in info["disk_backend_fallback"]
