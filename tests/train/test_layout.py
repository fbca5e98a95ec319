"""Training is not the model: `train/` uses `model/` and nothing of `app/` or `storage/`, and nothing
below it (model/, storage/) imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_train_uses_model_but_not_app_or_storage():
    roots = _imported_roots("train")
    assert "model" in roots
    assert "app" not in roots and "storage" not in roots, {k: roots.get(k) for k in ("app", "storage")}


def test_nothing_below_imports_train():
    for package in ("model", "storage"):
        assert "train" not in _imported_roots(package), package
    assert not (ROOT / "model" / "train").exists()
