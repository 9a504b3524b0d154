"""Imports flow one way (DESIGN.md): each part of `stages` imports only the parts below it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "data": set(),
    "models": {"data"},
    "evaluate": {"data", "models"},
    "extract": {"data", "models"},
    "train": {"data", "models", "evaluate"},
    "synthetic": {"data", "models", "train", "evaluate"},
    "search": {"data", "models", "evaluate", "extract"},
}


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        parts |= {name.split(".")[1] for name in names if name.startswith("stages.") and name.count(".") >= 1}
    return parts


def test_every_part_imports_only_the_parts_it_may() -> None:
    wrong = []
    for path in sorted((REPO / "stages").rglob("*.py")):
        relative = path.relative_to(REPO / "stages").parts
        if len(relative) == 1:
            continue  # the package's own __init__
        part = relative[0]
        assert part in ALLOWED, f"{path}: a part DESIGN.md does not name"
        bad = _imported_parts(path) - ALLOWED[part] - {part}
        wrong += [f"{path.relative_to(REPO)} imports stages.{b}" for b in sorted(bad)]
    assert not wrong, "\n".join(wrong)
