"""Every DVC stage depends on all the code it runs: a change to any module a stage imports re-runs the stage.

The imports are read statically (every `import` of a `stages` module, at the top or inside a function, followed
transitively), so a lazily imported module counts too. A package's `__init__.py` counts where it is imported by name
(`from stages.models import build_model`), not for every module under it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENTRY_MODULES = {  # stage -> what its `python pipeline.py ...` command imports from `stages`
    "synth": ["stages.synthetic.synth"],
    "pretrain_clip": ["stages.synthetic.pretrain_clip"],
    "prepare": ["stages.data.prepare"],
    "decode": ["stages.extract.decode", "stages.data.available"],
    "features": ["stages.extract.features"],
    "train_propy": ["stages.train.train_propy"],
    "evaluate_propy": ["stages.train.train_propy", "stages.evaluate.evaluator"],
    "train_baseline": ["stages.train.train_baseline"],
    "evaluate": ["stages.train.train_baseline", "stages.evaluate.evaluator"],
    "report": ["stages.evaluate.report", "stages.evaluate.evaluator"],
    "figures": ["stages.evaluate.figures", "stages.evaluate.propy_figures", "stages.train.train_propy"],
}


def module_path(name: str) -> Path:
    path = REPO / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_stages_modules(name: str) -> set[str]:
    """`name` and every `stages` module it imports, transitively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        module = todo.pop()
        if module in seen or not module_path(module).is_file():
            continue
        seen.add(module)
        for node in ast.walk(ast.parse(module_path(module).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
                todo.append(node.module)
                todo += [f"{node.module}.{alias.name}" for alias in node.names]  # `from pkg import module`
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("stages")]
    return seen


def stage_deps(stage: dict) -> list[str]:
    return (stage.get("do") or stage)["deps"]


@pytest.mark.parametrize("stage_name", sorted(ENTRY_MODULES))
def test_a_stage_depends_on_every_module_it_runs(stage_name: str) -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = [d for d in stage_deps(stages[stage_name]) if d.startswith("stages/")]
    modules = set().union(*(imported_stages_modules(m) for m in ENTRY_MODULES[stage_name]))
    files = {module_path(m).relative_to(REPO).as_posix() for m in modules}
    missing = sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"{stage_name} runs {missing} but does not depend on them (dvc.yaml)"


def test_every_command_stage_is_checked() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(ENTRY_MODULES)
