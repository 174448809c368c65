"""--help, --version and usage errors answer without importing torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from tierkv.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = 0
print("heavy:", sorted(m for m in ("torch", "transformers") if m in sys.modules), "code:", code, file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.parametrize("args", [("--help",), ("--version",), ("run", "--help"), ("chat", "--help"),
                                  ("cache", "--help"), ("run", "--no-such-flag"), ("run", "-n", "-1", "hi"),
                                  ("run", "--temperature", "-1", "hi"), ("run", "")])
def test_no_heavy_import(args):
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    assert "heavy: []" in r.stderr, r.stderr
    assert ("code: 0" in r.stderr) == (args[-1] in ("--help", "--version"))
