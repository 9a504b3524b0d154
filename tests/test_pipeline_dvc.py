"""End to end: `dvc repro` of the real dvc.yaml and pipeline.py on a copy of the repository, with tiny params.

It runs every stage (synth -> pretrain_clip -> prepare -> decode -> features -> train_propy / train_baseline@* ->
evaluate_propy / evaluate@* -> report, figures) in subprocesses, as a user's `dvc repro` does, then checks that a
second `dvc repro` has nothing to do and that `dvc plots show` writes a page with every figure. About two minutes on
two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.dvc_project import REPO, dvc, init_project

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


def test_dvc_repro_runs_every_stage_then_has_nothing_to_do(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    update = {
        **TINY,
        "baselines": {name: {"train": TINY_BASELINE} for name, e in params["baselines"].items() if "train" in e},
    }
    init_project(repo, update)
    models = ["propy", *params["baselines"]]

    dvc(repo, "repro")

    for model in models:
        metrics = json.loads((repo / "metrics" / "synthetic" / f"{model}.json").read_text())
        assert metrics["split"] == "test" and 0.0 <= metrics["R1"] <= 100.0, model
    assert "0.5-r10" in json.loads((repo / "metrics/synthetic/propy.json").read_text())["moments"]
    report = (repo / "reports" / "synthetic.md").read_text()
    assert all(f"| `{model}` |" in report for model in models)
    assert (repo / "metrics/synthetic/propy_history.tsv").read_text().startswith("epoch")
    assert "up to date" in dvc(repo, "repro")
    figures = sorted(path.name for path in (repo / "figures" / "synthetic").glob("*.png"))
    assert {"training_curves.png", "efficiency_tradeoff.png", "propy_selected_events.png"} <= set(figures)
    dvc(repo, "plots", "show")
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert page.count("<img ") == len(figures) and "<script" not in page  # every figure, nothing to download
