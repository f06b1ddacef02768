"""The layering rules of docs/architecture.md, checked on every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "batchlab"

# layer -> batchlab layers it may import (itself always allowed)
ALLOWED = {
    "norm": set(),
    "report": {"fileio"},
    "store": set(),
    "argtypes": set(),
    "fileio": set(),
    "data": {"fileio"},
    "models": {"norm"},
    "tasks": {"data", "models", "norm"},
    "train": {"tasks", "norm", "store", "data"},
    "runs": {"tasks", "train", "store"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchlab."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("batchlab."):
                    found.add(alias.name.split(".")[1])
    return found


def test_layers_import_only_what_they_may():
    bad = []
    for path in SRC.rglob("*.py"):
        layer = _layer(path)
        if layer not in ALLOWED:
            continue
        for dep in _imports(path) - {layer} - ALLOWED[layer]:
            bad.append(f"{path.relative_to(SRC)} imports batchlab.{dep}")
    assert not bad, "layering violations:\n" + "\n".join(sorted(bad))


def test_report_never_imports_torch():
    for path in (SRC / "report").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{path} imports torch"
