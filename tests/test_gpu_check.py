"""The GPU check script's parts, at tiny sizes on the CPU: the training step, the loader stall, bf16 on fixtures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():  # noqa: ANN201 - the benchmark module
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def size(gpu_check) -> dict:  # noqa: ANN001
    return {**gpu_check.paper_size(tiny=True), "warmup": 0, "steps": 1}


def test_the_paper_size_is_the_paper_model(gpu_check) -> None:  # noqa: ANN001
    paper = gpu_check.paper_size(tiny=False)
    assert paper["videos"] == 24 and paper["model"].pyramid.num_frames == 32 and paper["arch"].vision_layers == 12


def test_step_part_measures_both_paths(gpu_check, size: dict) -> None:  # noqa: ANN001
    result = gpu_check.step_part(size, torch.device("cpu"))
    for path in ("fast", "faithful"):
        assert result[path]["step_s"] > 0 and result[path]["flops"] > 0 and result[path]["mfu"] is None
    assert result["faithful_over_fast"] > 0 and result["captions"] == 4


def test_stall_part_feeds_the_step_from_both_loaders(gpu_check, size: dict, tmp_path: Path) -> None:  # noqa: ANN001
    result = gpu_check.stall_part(size, torch.device("cpu"), 0, tmp_path)
    for mode in ("cpu_workers", "on_device"):
        assert len(result[mode]["step_s_all"]) == 1 and result[mode]["stall"] < 1.0
    assert result["compute_only_step_s"] > 0


def test_fixture_part_compares_bf16_and_fp32(gpu_check, fixtures_dir: Path) -> None:  # noqa: ANN001
    result = gpu_check.fixture_part(fixtures_dir, torch.device("cpu"))
    assert result["fp32"]["logits"] < 1e-4 and result["fp32"]["best_event_agreement"] == 1.0
    assert 0 < result["bf16"]["logits"] < 1.0 and json.dumps(result)


def test_a_failing_part_is_recorded_and_the_json_written(gpu_check, tmp_path: Path) -> None:  # noqa: ANN001
    arguments = ["--tiny", "--device", "cpu", "--workers", "0", "--out", str(tmp_path), "--fixtures", str(tmp_path)]
    report = gpu_check.main(arguments)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "error" in saved["fixtures"] and saved["step"]["fast"]["step_s"] > 0 and report["device"] == "cpu"
