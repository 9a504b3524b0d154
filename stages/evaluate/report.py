"""The report stage: `reports/<dataset>.md`, our numbers for every evaluated model beside the papers' numbers.

    python pipeline.py report
    dvc repro report

Every `metrics/<dataset>/<name>.json` written by an evaluation (models and named ablation runs) becomes a row, with
the split and the feature source it comes from. The published rows (ProPy Tables 2, 3, 10, 11; Prototypes Tables
1, 2, 3) are read from `paper_numbers.yaml` for the dataset named by `paper_dataset` (default: `base.dataset`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.files import atomic_write_text

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")
RECALLS = ("R1", "R5", "R10", "R100", "SumR")
MOMENT_KEYS = ("0.3-r10", "0.3-r100", "0.5-r10", "0.5-r100", "0.7-r10", "0.7-r100")


@dataclass(frozen=True)
class ReportConfig:
    """The `report` section of params.yaml."""

    output_dir: str = "reports"  # reports/<dataset>.md
    paper_dataset: str | None = None  # tvr | activitynet | charades | qvhighlights; null: base.dataset


def run_report(base: BaseConfig, cfg: ReportConfig) -> Path:
    """Write the report of `base.dataset` and return its path."""
    results = load_results(base.dataset_metrics)
    if not results:
        raise PipelineError(f"no metrics in {base.dataset_metrics}; run the evaluate stages first")
    papers = yaml.safe_load(PAPER_NUMBERS.read_text())
    paper_dataset = cfg.paper_dataset or base.dataset
    text = render_report(base.dataset, paper_dataset, results, papers)
    return atomic_write_text(Path(cfg.output_dir) / f"{base.dataset}.md", text)


def load_results(metrics_dir: Path) -> dict[str, dict[str, Any]]:
    """Every metrics file of a dataset that holds PRVR recalls, by name (file stem), sorted by name."""
    results = {}
    for path in sorted(metrics_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "SumR" in data:
            results[path.stem] = data
    return results


def render_report(dataset: str, paper_dataset: str, results: dict[str, dict[str, Any]], papers: dict[str, Any]) -> str:
    """The markdown report."""
    lines = [f"# PRVR results on `{dataset}`", ""]
    lines += ["## Our runs", "", *_recall_table(_our_rows(results)), ""]
    moment_rows = [
        {"model": name, "split": r.get("split", "?"), **r["moments"]} for name, r in results.items() if r.get("moments")
    ]
    if moment_rows:
        lines += ["### Weakly supervised moment retrieval", "", *_table(moment_rows, ("model", "split", *MOMENT_KEYS))]
        lines.append("")
    efficiency_rows = [_efficiency_row(name, r["efficiency"]) for name, r in results.items() if r.get("efficiency")]
    if efficiency_rows:
        columns = ("model", *dict.fromkeys(k for row in efficiency_rows for k in row if k != "model"))
        lines += ["### Efficiency (this machine)", "", *_table(efficiency_rows, columns), ""]
    lines += [f"## Published numbers ({paper_dataset})", ""]
    prvr = papers["prvr"].get(paper_dataset)
    if prvr is None:
        lines += [f"The papers report no numbers for `{paper_dataset}` (set `report.paper_dataset` to compare).", ""]
        return "\n".join(lines)
    lines += [f"Split: {prvr['split']}.", "", *_recall_table(prvr["rows"], with_source=True), ""]
    moments = papers["moments"].get(paper_dataset)
    if moments:
        columns = ("model", "features", *MOMENT_KEYS)
        lines += [f"### {moments['source']}", "", *_table(moments["rows"], columns), ""]
    efficiency = papers["efficiency"].get(paper_dataset)
    if efficiency:
        columns = tuple(dict.fromkeys(k for row in efficiency["rows"] for k in row))
        lines += [f"### {efficiency['source']}", "", *_table(efficiency["rows"], columns), ""]
    return "\n".join(lines)


def _our_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, result in results.items():
        rows.append({"model": name, "features": result.get("feature_source", "?"), **result})
        if result.get("untrained"):
            rows.append(
                {"model": f"{name} (untrained)", "features": result.get("feature_source", "?"), **result["untrained"]}
            )
    return rows


def _recall_table(rows: list[dict[str, Any]], with_source: bool = False) -> list[str]:
    columns = (("source",) if with_source else ()) + ("model", "features")
    columns += () if with_source else ("split",)
    columns += RECALLS + (() if with_source else ("MedR", "MeanR"))
    return _table(rows, columns)


def _efficiency_row(name: str, efficiency: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    for key, value in efficiency.items():
        if isinstance(value, dict):
            row.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, dict)})
        else:
            row[key] = value
    return row


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    return [header, rule, *("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)
