"""The report: every run with its intervals and configuration, best and runner-up, paired comparisons, seed spreads,
a readable efficiency table, the papers' numbers, and README's summary block taken from the committed report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.evaluate.metrics import ground_truth_digest, prvr_metrics_from_ranks
from stages.evaluate.report import (
    PAPER_NUMBERS,
    SUMMARY_BEGIN,
    SUMMARY_END,
    ReportConfig,
    non_default_settings,
    run_report,
    summary_block,
)
from stages.models.propy import ProPyConfig

REPO = Path(__file__).resolve().parents[1]
GT = ground_truth_digest(np.arange(400) % 40, 40)


def _metrics(ranks: np.ndarray, split: str = "test", **extra) -> dict:
    """A metrics file as the evaluator writes it, from per-query ranks."""
    return {
        **prvr_metrics_from_ranks(ranks),
        "ranks": [int(r) for r in ranks],
        "ground_truth_sha256": GT,
        "split": split,
        "num_queries": len(ranks),
        "num_videos": 40,
        "feature_source": "clip_vit-b-32.h5",
        **extra,
    }


def _ranks(seed: int, better: float = 0.0) -> np.ndarray:
    """400 ranks in 1..40; a fraction `better` of them moved to rank 1."""
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 41, 400)
    ranks[rng.random(400) < better] = 1
    return ranks


def _write(folder: Path, name: str, metrics: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(metrics))


def _row(text: str, model: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| `{model}` |"))


@pytest.fixture()
def base(tmp_path: Path) -> BaseConfig:
    base = BaseConfig(dataset="tvr", metrics_dir=str(tmp_path / "metrics"), seed=42)
    shared = _ranks(0)
    _write(base.dataset_metrics, "clip_mil", _metrics(shared))
    msl = _ranks(0, better=0.05)  # clip_mil's ranks with 5 % of the queries solved: a small, real difference
    _write(base.dataset_metrics, "msl", _metrics(msl, moments={"0.5-r10": 12.5}, untrained=_metrics(_ranks(5))))
    propy = _ranks(0, better=0.3)
    efficiency = {
        "bytes_per_video": 9728,
        "params_trainable": 87872,
        "params_total": 7739969,
        "device": "cpu",
        "repeats": 5,
        "encoding_ms_per_query": {"1000": 2.5, "10000": 2.6},
        "encoding_ms_per_query_iqr": {"1000": 0.1, "10000": 0.2},
        "matching_ms_per_query": {"1000": 0.25, "10000": 2.85},
        "matching_ms_per_query_iqr": {"1000": 0.01, "10000": 0.05},
        "total_ms_per_query": {"1000": 2.75, "10000": 5.45},
        "total_ms_per_query_iqr": {"1000": 0.1, "10000": 0.2},
    }
    counts = {"queries_total": 410, "queries_evaluated": 400, "videos_unavailable": 2}
    _write(base.dataset_metrics, "propy", _metrics(propy, efficiency=efficiency, **counts))
    (base.dataset_metrics / "propy_history.json").write_text(json.dumps([{"epoch": 1}]))  # not a result: skipped
    return base


def _report(base: BaseConfig, tmp_path: Path, **kwargs) -> str:
    configs = {"propy": ProPyConfig(event_interaction="W", adapter_channels=64)}
    return run_report(base, ReportConfig(output_dir=str(tmp_path / "reports")), configs, **kwargs).read_text()


def test_rows_give_each_value_with_its_half_width_and_the_configuration(base: BaseConfig, tmp_path: Path) -> None:
    text = _report(base, tmp_path)
    propy = json.loads((base.dataset_metrics / "propy.json").read_text())
    row = _row(text.split("## Our runs")[1], "propy")
    low, high = propy["ci"]["SumR"]
    assert f"{propy['SumR']:.2f} ± {(high - low) / 2:.2f}" in row
    assert "| seed 42; adapter_channels=64, event_interaction=W | clip_vit-b-32.h5 | test |" in row
    assert "| `msl` | seed 42 |" in text and "| `msl` (untrained) | seed 42; at initialisation |" in text
    assert "| R@1 | R@5 | R@10 | R@100 | SumR | MedR | MeanR |" in text
    assert "propy_history" not in text
    assert "- `propy`: 400 of 410 queries evaluated; 2 videos unavailable" in text


def test_best_and_runner_up_are_marked_and_overlaps_named(base: BaseConfig, tmp_path: Path) -> None:
    runs = _report(base, tmp_path).split("## Our runs")[1].split("###")[0]
    propy_sumr, msl_sumr = _row(runs, "propy").split(" | ")[8], _row(runs, "msl").split(" | ")[8]
    assert propy_sumr.startswith("**") and msl_sumr.startswith("_")  # best and runner-up SumR
    assert "**" not in _row(runs, "clip_mil").split(" | ")[8]
    assert "(untrained)" not in "".join(line for line in runs.splitlines() if "**" in line or "| _" in line)
    # every rank is within 40, so R@100 is 100 for all: there the runner-up ties the best
    assert re.search(r"overlapping 95 % intervals in .*R@100", runs)


def test_paired_comparison_resolves_a_real_difference_and_not_a_null_one(base: BaseConfig, tmp_path: Path) -> None:
    paired = _report(base, tmp_path).split("### Paired comparisons")[1].split("###")[0]
    assert "SumR − `propy` | 95 % interval | excludes 0 | SumR − `clip_mil` | 95 % interval | excludes 0 |" in paired
    cells = _row(paired, "msl").split(" | ")
    assert cells[1].startswith("-") and cells[3] == "yes"  # msl is far below propy
    assert cells[4].startswith("+") and cells[6].rstrip(" |") == "yes"  # and resolvably above clip_mil (paired)
    _write(base.dataset_metrics, "gmmformer", _metrics(_ranks(0)))  # clip_mil's very ranks: a null difference
    paired = _report(base, tmp_path).split("### Paired comparisons")[1].split("###")[0]
    assert _row(paired, "gmmformer").split(" | ")[4:] == ["+0.00", "[+0.00, +0.00]", "no |"]


def test_paired_comparison_explains_what_it_cannot_compare(base: BaseConfig, tmp_path: Path) -> None:
    old = _metrics(_ranks(3))
    del old["ranks"]
    _write(base.dataset_metrics, "gmmformer", old)
    _write(base.dataset_metrics, "prototypes", {**_metrics(_ranks(4)), "ground_truth_sha256": "other"})
    paired = _report(base, tmp_path).split("### Paired comparisons")[1]
    assert "- `gmmformer` vs `propy`: no per-query ranks" in paired
    assert "- `prototypes` vs `clip_mil`: evaluated on different queries" in paired


def test_seed_runs_give_means_and_standard_deviations(base: BaseConfig, tmp_path: Path) -> None:
    assert "No seed runs yet" in _report(base, tmp_path) and "### Seeds" not in _report(base, tmp_path)
    sums = [json.loads((base.dataset_metrics / "propy.json").read_text())["SumR"]]
    for seed in (43, 44):
        metrics = _metrics(_ranks(seed, better=0.3))
        _write(base.dataset_metrics / "seeds" / f"seed{seed}", "propy", metrics)
        sums.append(metrics["SumR"])
    _write(base.dataset_metrics / "seeds" / "seed43", "msl", _metrics(_ranks(7, better=0.01)))
    text = _report(base, tmp_path)
    seeds = text.split("### Seeds")[1].split("###")[0]
    assert "base run (seed 42) and the seed runs (43, 44)" in seeds
    assert "| `propy` | 3 | 42, 43, 44 |" in seeds and f"{np.mean(sums):.2f} ± {np.std(sums, ddof=1):.2f}" in seeds
    assert "| `msl` | 2 | 42, 43 |" in seeds and "| `clip_mil` | 1 | 42 |" in seeds
    summary = summary_block(text, "report")
    assert "SumR over seeds 42, 43, 44 (mean ± std)" in summary
    assert f"{np.mean(sums):.2f} ± {np.std(sums, ddof=1):.2f}" in summary


def test_efficiency_table_has_readable_headers_and_parts_that_add_up(base: BaseConfig, tmp_path: Path) -> None:
    efficiency = _report(base, tmp_path).split("### Efficiency (this machine)")[1].split("##")[0]
    assert "| model | trainable params | total params | bytes stored per video | encoding ms/query @1k |" in efficiency
    assert "| matching ms/query @1k | total ms/query @1k | encoding ms/query @10k |" in efficiency
    assert "| `propy` | 87,872 | 7,739,969 | 9,728 | 2.500 (IQR 0.100) | 0.250 (IQR 0.010) | 2.750 (IQR 0.100) |" in (
        efficiency
    )
    assert "median (IQR) over 5 runs" in efficiency and "total = encoding + matching" in efficiency


def test_published_numbers_say_how_to_run_each_row(base: BaseConfig, tmp_path: Path) -> None:
    text = _report(base, tmp_path)
    propy = "| ProPy Tab. 2 | ProPy | CLIP ViT-B/32 (frames) | 22.40 | 45.00 | 55.90 | 89.50 | 212.80 |  | propy |"
    assert propy in text  # blank: no memory column value
    assert "| ProPy Tab. 2 | QASIR | CLIP ViT-B/32 | 19.00 |" in text and "| no public code |" in text
    assert "| Prototypes Tab. 5 | Prototypes (10) | CLIP L/14 |  |  |  |  | 252.90 | 0.03 |" in text
    assert "Prototypes Tab. 3" in text  # the TVR efficiency table of the Prototypes paper
    assert "| model | split | IoU 0.3 R@10 | IoU 0.3 R@100 | IoU 0.5 R@10 |" in text


def test_paper_numbers_are_complete_and_add_up() -> None:
    papers = yaml.safe_load(PAPER_NUMBERS.read_text())
    rows = [row for dataset in papers["prvr"].values() for row in dataset["rows"]]
    sources = {row["source"] for row in rows}
    for table in ("ProPy Tab. 2", "ProPy Tab. 3", "Prototypes Tab. 1", "Prototypes Tab. 5", "Prototypes Tab. 6"):
        assert any(table in source for source in sources), table
    assert len(papers["prvr"]["tvr"]["rows"]) >= 30 and len(papers["moments"]["activitynet"]["rows"]) == 5
    for row in rows:
        assert {"source", "model", "features", "SumR", "run"} <= set(row), row
        if all(f"R{k}" in row for k in (1, 5, 10, 100)) and "note" not in row:  # the transcription: SumR adds up
            assert sum(row[f"R{k}"] for k in (1, 5, 10, 100)) == pytest.approx(row["SumR"], abs=0.15), row
    assert [row["model"] for row in rows if "note" in row] == ["GMMFormer"]  # the paper's own sum is off by 1.8
    assert all(row["run"] == "no public code" for row in rows if row["model"].startswith("QASIR"))
    ours = {"msl", "gmmformer", "gmmformer2", "amdnet", "prototypes", "propy"}
    assert ours <= {row["run"].split()[0].rstrip(":,") for row in rows}
    assert any("preset dgl_mil" in row["run"] for row in rows if row["model"] == "DGL-MIL")


def test_no_metrics_and_no_published_numbers(tmp_path: Path) -> None:
    base = BaseConfig(dataset="synthetic", metrics_dir=str(tmp_path / "metrics"))
    with pytest.raises(PipelineError, match="no metrics"):
        run_report(base, ReportConfig(output_dir=str(tmp_path)))
    _write(base.dataset_metrics, "propy", _metrics(_ranks(0)))
    text = run_report(base, ReportConfig(output_dir=str(tmp_path))).read_text()
    assert "report no numbers for `synthetic`" in text
    assert "charades" in run_report(base, ReportConfig(output_dir=str(tmp_path), paper_dataset="charades")).read_text()


def test_readme_block_is_rewritten_from_the_report(base: BaseConfig, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{SUMMARY_BEGIN}\nold table\n{SUMMARY_END}\n\nafter\n")
    text = _report(base, tmp_path, readme=readme)
    written = readme.read_text()
    assert written.startswith("# Title\n\nbefore\n\n") and written.endswith("\n\nafter\n")
    assert summary_block(written, "README") == summary_block(text, "report") and "old table" not in written
    readme.write_text("no markers")
    with pytest.raises(PipelineError, match="no report summary block"):
        _report(base, tmp_path, readme=readme)


def test_readme_results_come_from_the_committed_report() -> None:
    report = summary_block((REPO / "reports" / "synthetic.md").read_text(), "reports/synthetic.md")
    readme = summary_block((REPO / "README.md").read_text(), "README.md")
    assert readme == report, (
        "README.md's results differ from reports/synthetic.md: `python pipeline.py report --readme`"
    )


def test_non_default_settings_are_dotted_keys() -> None:
    config = ProPyConfig.preset("dgl_mil", adapter_channels=64)
    settings = non_default_settings(config)
    assert settings == {
        "adapter_channels": 64,
        "event_interaction": "W",
        "event_frame_area": "all",
        "visual_prompt_copy": "none",
        "frame_update": "attn_whole",
    }
    assert non_default_settings(ProPyConfig()) == {}
