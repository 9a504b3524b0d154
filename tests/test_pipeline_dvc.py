"""End to end: `dvc repro` of the real dvc.yaml and pipeline.py on a copy of the repository, with tiny params.

It runs every stage (synth -> pretrain_clip -> prepare -> decode -> features -> train_propy / train_baseline@* ->
evaluate_propy / evaluate@* -> report, figures) in subprocesses, as a user's `dvc repro` does, then checks that a
second `dvc repro` has nothing to do and that `dvc plots show` writes a page with every figure. About two minutes on
two CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "synth": {"train_videos": 8, "val_videos": 4, "test_videos": 4, "min_duration": 6.0, "max_duration": 8.0,
              "min_events": 3, "max_events": 3, "captions": [2, 3], "workers": 1},
    "pretrain_clip": {"steps": 3, "batch_size": 8, "eval_frames": 16},
    "decode": {"workers": 1},
    "features": {"workers": 0},
    "train_propy": {"epochs": 1, "batch_videos": 4, "eval_batch_videos": 4},
    "evaluate": {"protocol": {"efficiency": {"corpus_sizes": [50], "repeats": 1}}, "batch_videos": 4},
}  # fmt: skip
TINY_BASELINE = {"n_epoch": 1, "batch_size": 4, "hard_negative_start_epoch": 0, "max_es_cnt": 0}


def _merge(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _copy_tracked_tree(destination: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = REPO / name
        if source.is_file() and not name.startswith(("tests/", "benchmarks/")):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_dvc_repro_runs_every_stage_then_has_nothing_to_do(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _copy_tracked_tree(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    _merge(params, TINY)
    for entry in params["baselines"].values():
        if "train" in entry:
            entry["train"].update(TINY_BASELINE)
    models = ["propy", *params["baselines"]]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@localhost"}  # fmt: skip
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny"], repo, env)

    _run([str(Path(bin_dir) / "dvc"), "repro"], repo, env)

    for model in models:
        metrics = json.loads((repo / "metrics" / "synthetic" / f"{model}.json").read_text())
        assert metrics["split"] == "test" and 0.0 <= metrics["R1"] <= 100.0, model
    assert "0.5-r10" in json.loads((repo / "metrics/synthetic/propy.json").read_text())["moments"]
    report = (repo / "reports" / "synthetic.md").read_text()
    assert all(f"| `{model}` |" in report for model in models)
    assert (repo / "metrics/synthetic/propy_history.tsv").read_text().startswith("epoch")
    assert "up to date" in _run([str(Path(bin_dir) / "dvc"), "repro"], repo, env)
    figures = sorted(path.name for path in (repo / "figures" / "synthetic").glob("*.png"))
    assert {"training_curves.png", "efficiency_tradeoff.png", "propy_selected_events.png"} <= set(figures)
    _run([str(Path(bin_dir) / "dvc"), "plots", "show"], repo, env)
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert page.count("<img ") == len(figures) and "<script" not in page  # every figure, nothing to download
