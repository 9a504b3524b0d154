"""The registry is the one list of models: params.yaml and dvc.yaml must agree with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.data.errors import PipelineError
from stages.models import available_models, build_model, model_spec
from tests.tiny_baselines import TINY_BASELINES

REPO = Path(__file__).resolve().parents[1]


def test_params_baselines_are_exactly_the_registered_feature_models() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert sorted(params["baselines"]) == available_models("features")
    assert available_models("frames") == ["propy"]


def test_dvc_stages_iterate_over_the_params_baselines() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["train_baseline"]["foreach"] == "${baselines}"
    assert stages["evaluate"]["foreach"] == "${baselines}"


def test_every_trainable_baseline_names_its_config_and_builds_from_it() -> None:
    for name in available_models("features"):
        spec = model_spec(name)
        if spec.trainable:
            assert spec.config is not None, name
            assert callable(build_model(name, cfg=spec.config()).score_fn), name


def test_every_trainable_baseline_has_a_tiny_config_for_the_tests_that_cover_them_all() -> None:
    trainable = {name for name in available_models("features") if model_spec(name).trainable}
    assert trainable == set(TINY_BASELINES)


def test_unknown_model_names_the_registered_ones() -> None:
    with pytest.raises(PipelineError, match="available: .*msl"):
        model_spec("msll")
