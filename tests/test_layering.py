"""Imports flow one way, downwards (DESIGN.md): a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import tierkv

LAYERS = [
    {"config", "errors", "paths", "sample", "sample_config", "stop_text", "inputs", "detokenize"},
    {"kernels", "io"},
    {"kv", "weights"},
    {"models"},
    {"engine", "graph", "plan", "oom"},
    {"llm"},
    {"chat", "chat_template", "session", "bench"},
    {"cli"},
]
ROOT = Path(tierkv.__file__).parent
# Deliberate upward imports, each done inside a function on use.
ALLOWED = {("llm", "tierkv.chat"): "LLM.chat() is the public API of sessions (issue 7)",
           ("kv", "tierkv.models.config"): "kv/factory.py sizes caches from the model's shape (ModelConfig: data only, "
                                           "no weights or forward)"}


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("tierkv.") else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"tierkv.{top} has no layer in tests/test_layering.py; add it")


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.name in ("__init__", "__main__") and len(rel.parts) == 1:
            continue  # the package's public face may import anything
        own = _layer("tierkv." + ".".join(rel.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                if name.startswith("tierkv.") and _layer(name) > own and (rel.parts[0], name) not in ALLOWED:
                    bad.append(f"{'/'.join(rel.parts)}.py imports {name}")
    assert not bad, "; ".join(bad)


def _imported_names(node: ast.AST, package: str) -> list[str]:
    """Dotted names an import statement brings in ("a.b" for `from a import b`), relative ones resolved against
    package (the importing file's package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parent = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def test_no_test_or_bench_script_imports_a_test_module_or_a_conftest():
    """Shared test code lives in helper modules (tests/helpers.py, tests/<area>/helpers.py, tests/kernels/kutil.py):
    a test module imported by another has its tests collected twice, and conftests are pytest's to load."""
    repo = ROOT.parent
    bad = []
    for folder in ("tests", "bench"):
        for path in (repo / folder).rglob("*.py"):
            rel = path.relative_to(repo).with_suffix("")
            for node in ast.walk(ast.parse(path.read_text())):
                for name in _imported_names(node, ".".join(rel.parts[:-1])):
                    last = name.rsplit(".", 1)[-1]
                    if last.startswith("test_") or last == "conftest":
                        bad.append(f"{rel}.py imports {name}")
    assert not bad, "; ".join(sorted(set(bad)))


def test_no_two_modules_import_each_other():
    """A pair of modules that import each other (at the top or inside a function) shares pieces that belong in a
    third, lower module. A package and its own submodules are exempt (the package re-exports them)."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = {n for node in ast.walk(ast.parse(path.read_text())) for n in _imported_names(node, pkg)}
        imports[name] = found & mods.keys() - {name}
    both = {tuple(sorted((a, b))) for a in imports for b in imports[a] if a in imports[b]}
    bad = [f"{a} <-> {b}" for a, b in sorted(both) if not b.startswith(a + ".")]
    assert not bad, "; ".join(bad)


KV_LAYERS = [{"interface", "storage"}, {"placement"}, {"sparse"}, {"caches"}, {"factory"}]


def _kv_layer(module: str) -> int:
    part = module.split(".")[2]
    return next(i for i, names in enumerate(KV_LAYERS) if part in names)


def test_kv_subpackages_import_downwards():
    """Inside kv/ (docs/ARCHITECTURE.md): storage, then placement, sparse, caches, factory."""
    bad = []
    for path in (ROOT / "kv").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if len(rel.parts) < 2 or rel.parts[1] == "__init__":
            continue
        own = _kv_layer("tierkv." + ".".join(rel.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tierkv.kv.") \
                    and _kv_layer(node.module) > own:
                bad.append(f"{'/'.join(rel.parts)}.py imports {node.module}")
    assert not bad, "; ".join(bad)
