"""`verify-reference propy-train`: train-propy's loop equals K steps of the official one, and each named deviation
from the official loop changes what it should (and only that)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline import cli
from stages.train.propy_reference import TRAIN_TOLERANCE, TrainFixture, compare_steps

DEAD = (  # official names of the parameters that never get a gradient (postfix projection, last layer's adapter)
    "clip.postfix_proj.weight",
    "clip.visual.transformer.resblocks.1.temp_adapter.fc1.weight",
    "clip.visual.transformer.resblocks.1.temp_adapter.conv.weight",
    "clip.visual.transformer.resblocks.1.temp_adapter.fc2.weight",
)


@pytest.fixture(scope="module")
def prefix(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "propy_official" / "train_cfg32")


@pytest.fixture(scope="module")
def fixture(prefix: str) -> TrainFixture:
    return TrainFixture.load(prefix)


@pytest.fixture(scope="module")
def official_run(fixture: TrainFixture) -> dict:
    return fixture.train()[2]


def test_cli_passes_on_both_paths(prefix: str) -> None:
    result = CliRunner().invoke(cli, ["verify-reference", "propy-train", prefix])
    assert result.exit_code == 0, result.output
    assert '"faithful_state_step4"' in result.output and '"exp_avg_sq"' in result.output


def test_every_quantity_matches_on_the_fast_path(fixture: TrainFixture, official_run: dict) -> None:
    errors = compare_steps(official_run, fixture.steps)
    assert max(errors.values()) <= TRAIN_TOLERANCE, errors
    assert errors["lr"] < 1e-12 and errors["adam_step"] == 0.0
    assert [r["clip_coef"] < 1 for r in official_run["records"]] == [False, False, True, False]  # step 2 is clipped


def test_dead_parameters_decay_by_default_and_stay_put_when_left_out(fixture: TrainFixture, official_run) -> None:
    start = {name: torch.from_numpy(fixture.steps[f"state/{name}"][0]) for name in DEAD}
    trained = official_run["records"][-1]["state"]
    for name in DEAD:  # officially their moments stay 0 and only the decoupled decay moves them
        assert torch.all(trained[name].abs() < start[name].abs() + 1e-12) and not torch.equal(
            trained[name], start[name]
        )
    _, _, frozen = fixture.train(decay_dead_parameters=False)
    left_out = frozen["records"][-1]["state"]
    errors = compare_steps(frozen, fixture.steps)
    assert errors["state_step4"] > 1e-4  # the decay they miss: sum_k lr_k x 0.2 = 3.6e-4
    for name, value in left_out.items():
        if name in DEAD:
            assert torch.equal(value, start[name])
        else:  # nothing else changes: dead parameters add 0 to the gradient norm
            assert torch.equal(value, trained[name]), name


def test_whole_step_warmup_and_no_floor_change_only_the_schedule(fixture: TrainFixture, official_run) -> None:
    rounded = fixture.train(warmup_whole_steps=True)[2]
    whole = compare_steps(rounded, fixture.steps)
    assert whole["lr"] > 0.1 and whole["state_step4"] > 1e-3  # README: rounding S = 2.4 to 2 moves the state 1.2e-3
    assert [r["lr"][0] for r in rounded["records"]][:3] == pytest.approx([1e-8, 1e-8 + (8e-4 - 1e-8) / 2, 8e-4])
    assert torch.equal(rounded["records"][0]["loss"], official_run["records"][0]["loss"])  # same first step
    _, _, unfloored = fixture.train(lr_floor=0.0)
    assert unfloored["records"][0]["lr"] == [0.0, 0.0]
    assert compare_steps(unfloored, fixture.steps)["state_step4"] < TRAIN_TOLERANCE  # 1e-8 vs 0: below the bar
    start = {name: torch.from_numpy(fixture.steps[f"state/{name}"][0]) for name in DEAD}
    assert all(torch.equal(unfloored["records"][0]["state"][n], start[n]) for n in DEAD)  # lr 0: no decay at all


def test_missing_fixture_files_are_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["verify-reference", "propy-train", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "reference fixture files missing" in result.output
