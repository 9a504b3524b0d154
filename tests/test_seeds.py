"""Seed runs: another training seed, the same data and settings, models and metrics in their own folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline import cli
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.evaluate.report import load_runs
from stages.models.trained import baseline_dir, propy_dir
from stages.train.baseline_training import BaselineTrainConfig
from stages.train.seeds import run_seeds, seed_run
from stages.train.train_baseline import BaselineStageConfig, run_evaluate_baseline, run_train_baseline
from stages.train.train_propy import TrainPropyConfig
from tests.test_train_baseline import PROTOCOL, base  # noqa: F401 - `base`: the toy feature store fixture

MSL = BaselineStageConfig(
    model={"hidden_size": 32, "n_heads": 2, "max_ctx_l": 16, "max_desc_l": 8, "map_size": 4},
    train=BaselineTrainConfig(n_epoch=1, batch_size=6, hard_negative_start_epoch=1, eval_video_batch=6),
)


def test_a_named_run_keeps_inputs_shared_and_outputs_apart() -> None:
    tvr = BaseConfig(dataset="tvr", seed=42)
    run = seed_run(tvr, 43)
    assert (run.seed, run.run) == (43, "seeds/seed43")
    assert run.features_path() == tvr.features_path() and run.frames_path == tvr.frames_path
    assert run.annotations_path == tvr.annotations_path
    assert propy_dir(run) == Path("cache/tvr/seeds/seed43/propy")
    assert baseline_dir(run, "msl") == Path("cache/tvr/seeds/seed43/baselines/msl")
    assert run.dataset_metrics == Path("metrics/tvr/seeds/seed43") and tvr.dataset_metrics == Path("metrics/tvr")
    with pytest.raises(PipelineError, match="relative folder"):
        BaseConfig(run="../elsewhere")


def test_seed_runs_train_with_their_seed_and_write_their_own_files(base: BaseConfig) -> None:  # noqa: F811
    run_train_baseline(base, "msl", MSL)
    run_evaluate_baseline(base, "msl", MSL, PROTOCOL)
    base_file = base.dataset_metrics / "msl.json"
    before = base_file.read_text()
    written = run_seeds(base, [43, 44], ["msl"], TrainPropyConfig(), {"msl": MSL}, PROTOCOL)
    assert written == [base.dataset_metrics / "seeds" / f"seed{s}" / "msl.json" for s in (43, 44)]
    assert base_file.read_text() == before  # the base run is untouched
    weights = {
        seed: load_file(str(baseline_dir(run, "msl") / "model.safetensors"))
        for seed, run in ((42, base), (43, seed_run(base, 43)), (44, seed_run(base, 44)))
    }
    for other in (43, 44):  # another seed, other weights (initialisation and batches)
        assert any(not torch.equal(weights[42][key], weights[other][key]) for key in weights[42])
    record = json.loads((baseline_dir(seed_run(base, 43), "msl") / "training.json").read_text())
    assert record["train_config"]["seed"] == MSL.train.seed + 43
    runs = load_runs(base.dataset_metrics, base.seed)
    assert sorted(runs.seeds) == [43, 44] and [s for s, _ in runs.runs_of("msl")] == [42, 43, 44]
    assert run_seeds(base, [43], ["msl"], TrainPropyConfig(), {"msl": MSL}, PROTOCOL, missing_only=True) == []


def test_bad_seed_requests_are_clear_errors(base: BaseConfig) -> None:  # noqa: F811
    for seeds, models, message in [
        ([], ["msl"], "at least one seed"),
        ([42], ["msl"], "differ from the base run's seed 42"),
        ([43, 43], ["msl"], "distinct"),
        ([43], ["clip_mil"], "nothing to train"),
        ([43], ["gmmformer"], "no entry in the params `baselines` section"),
    ]:
        with pytest.raises(PipelineError, match=message):
            run_seeds(base, seeds, models, TrainPropyConfig(), {"msl": MSL}, PROTOCOL)


def test_the_seeds_command_parses_its_options(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("base: {dataset: toy, seed: 42}\nbaselines: {msl: {}}\n")
    result = CliRunner().invoke(cli, ["--params", str(params), "seeds", "--seeds", "42"])
    assert result.exit_code == 1 and "differ from the base run's seed 42" in result.output
    result = CliRunner().invoke(cli, ["--params", str(params), "seeds", "--seeds", "43,x"])
    assert result.exit_code == 1 and "comma-separated integers" in result.output
