"""The kernels package imports only torch, triton and tierkv.errors/config, and triton only in *_triton.py."""

import ast
from pathlib import Path

import tierkv.kernels

ALLOWED = {"__future__", "importlib", "math", "os", "typing", "torch", "triton", "tierkv.errors", "tierkv.config", "tierkv.kernels"}


def test_kernel_imports_stay_low():
    for path in Path(tierkv.kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert any(name == a or name.startswith(a + ".") for a in ALLOWED), f"{path.name} imports {name}"
                if name.split(".")[0] == "triton":
                    assert path.stem.endswith("_triton"), f"{path.name} imports triton outside a *_triton module"
