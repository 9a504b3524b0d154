"""The report puts every evaluated run beside the papers' numbers for the dataset, naming split and features."""

from __future__ import annotations

import json

import pytest

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.evaluate.report import ReportConfig, run_report


def _metrics(split: str, sumr: float) -> dict:
    return {
        "R1": 1.0,
        "R5": 2.0,
        "R10": 3.0,
        "R100": sumr - 6.0,
        "SumR": sumr,
        "MedR": 7.0,
        "MeanR": 9.5,
        "split": split,
        "feature_source": "clip_vit-b-32.h5",
    }


def test_report_rows_and_paper_tables(tmp_path) -> None:
    base = BaseConfig(dataset="tvr", metrics_dir=str(tmp_path / "metrics"))
    base.dataset_metrics.mkdir(parents=True)
    msl = _metrics("val", 100.0)
    msl["moments"] = {"0.5-r10": 12.5}
    (base.dataset_metrics / "msl.json").write_text(json.dumps(msl))
    (base.dataset_metrics / "propy.json").write_text(
        json.dumps({**_metrics("val", 150.0), "untrained": _metrics("val", 20.0)})
    )
    (base.dataset_metrics / "propy_history.json").write_text(json.dumps([{"epoch": 1}]))  # not a result: skipped
    text = run_report(base, ReportConfig(output_dir=str(tmp_path / "reports"))).read_text()
    assert "| msl | clip_vit-b-32.h5 | val | 1.00 | 2.00 | 3.00 | 94.00 | 100.00 | 7.00 | 9.50 |" in text
    assert "| propy (untrained) |" in text and "propy_history" not in text
    assert "| msl | val |  |  | 12.50 |  |  |  |" in text  # moment recalls, blank where not measured
    assert "| ProPy Tab. 2 | ProPy | CLIP ViT-B/32 (frames) | 22.40 | 45.00 | 55.90 | 89.50 | 212.80 |" in text
    assert "Prototypes Tab. 3" in text  # TVR efficiency table of the Prototypes paper


def test_dataset_without_published_numbers_and_no_metrics(tmp_path) -> None:
    base = BaseConfig(dataset="synthetic", metrics_dir=str(tmp_path / "metrics"))
    with pytest.raises(PipelineError, match="no metrics"):
        run_report(base, ReportConfig(output_dir=str(tmp_path)))
    base.dataset_metrics.mkdir(parents=True)
    (base.dataset_metrics / "propy.json").write_text(json.dumps(_metrics("test", 50.0)))
    text = run_report(base, ReportConfig(output_dir=str(tmp_path))).read_text()
    assert "report no numbers for `synthetic`" in text
    assert "charades" in run_report(base, ReportConfig(output_dir=str(tmp_path), paper_dataset="charades")).read_text()
