"""The figures stage: PNG figures of every evaluated model, registered as DVC image plots (they render offline).

    python pipeline.py figures                  # figures/<dataset>/*.png
    dvc repro figures && dvc plots show         # dvc_plots/index.html shows every PNG; no script, no network

From the metrics folder and the training histories (models are the metrics files found, nothing is listed here):
- `training_curves.png`: validation R@1 and SumR against epoch for every trained model (ProPy's
  `propy_history.tsv`, each baseline's `training.json`), the selected epoch marked, frozen CLIP as a line;
- `efficiency_tradeoff.png`: SumR against bytes stored per video and against total ms per query (encoding plus
  matching) at the largest probed corpus, with SumR's 95 % interval and the timing IQR;
- `recall_vs_corpus_size.png`: expected R@1, R@10 and SumR on random sub-corpora of every size up to the evaluated
  corpus, exact from the per-query ranks (`metrics.recall_at_corpus_sizes`).
From a trained ProPy, when there is one (`propy_figures`): its Figure 4 (event-prompt attention), Figure 5 (the
selected events over pyramid layers and lengths) and a 2-D map of event features.

Figures are drawn with matplotlib's object API on the Agg canvas: no display, no global pyplot state.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.evaluate.metrics import recall_at_corpus_sizes
from stages.evaluate.plotting import model_colours, new_figure, save
from stages.evaluate.propy_figures import PropyFiguresConfig, PropyInputs, draw_propy_figures
from stages.evaluate.report import load_results
from stages.models.registry import available_models, model_spec
from stages.models.trained import baseline_dir, propy_dir


@dataclass(frozen=True)
class FiguresConfig:
    """The `figures` section of params.yaml."""

    output_dir: str = "figures"  # figures/<dataset>/*.png
    dpi: int = 130
    propy: PropyFiguresConfig = field(default_factory=PropyFiguresConfig)  # ProPy's Figures 4 and 5, event map


def run_figures(base: BaseConfig, cfg: FiguresConfig, propy: PropyInputs) -> list[Path]:
    """Write every figure of `base.dataset` to `<output_dir>/<dataset>/` and return their paths.

    Args:
        base: dataset and folders.
        cfg: what to draw.
        propy: how ProPy reads its inputs, for its figures (drawn when ProPy was evaluated).
    """
    results = load_results(base.dataset_metrics)
    if not results:
        raise PipelineError(f"no metrics in {base.dataset_metrics}; run the evaluate stages first")
    out = Path(cfg.output_dir) / base.dataset
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):  # the folder holds this run's figures only (a DVC output)
        stale.unlink()
    written = [
        training_curves(base, results, out / "training_curves.png", cfg.dpi),
        efficiency_tradeoff(results, out / "efficiency_tradeoff.png", cfg.dpi),
        recall_vs_corpus_size(results, out / "recall_vs_corpus_size.png", cfg.dpi),
    ]
    if any(_reads_frames(name) for name in results):
        if not (propy_dir(base) / "best.pt").is_file():
            raise PipelineError(
                f"{propy_dir(base)} holds no best.pt for ProPy's figures; run `python pipeline.py train-propy`"
            )
        written += draw_propy_figures(base, cfg.propy, propy, out, cfg.dpi)
    return [path for path in written if path is not None]


# ------------------------------------------------------------------------------------------------------------------
# Figures from metrics and histories
# ------------------------------------------------------------------------------------------------------------------


def training_curves(base: BaseConfig, results: dict[str, dict[str, Any]], path: Path, dpi: int) -> Path | None:
    """Validation R@1 and SumR against epoch for every model with a history."""
    histories = {name: history for name in results if (history := training_history(base, name))}
    if not histories:
        return None
    split = next(iter(histories.values()))["split"]
    colours = model_colours(results)
    figure, axes = new_figure(1, 2, (11, 4.2))
    for name, history in sorted(histories.items()):
        epochs = [row["epoch"] for row in history["rows"]]
        for ax, key in zip(axes, ("R1", "SumR"), strict=True):
            values = [row[key] for row in history["rows"]]
            ax.plot(epochs, values, marker="o", markersize=3, label=name, color=colours[name])
            if history["best_epoch"] in epochs:
                best = values[epochs.index(history["best_epoch"])]
                ax.plot([history["best_epoch"]], [best], marker="*", markersize=12, color=colours[name])
    for ax, key in zip(axes, ("R1", "SumR"), strict=True):
        for name, result in results.items():  # untrained references: a horizontal line at their validation score
            validation = result.get("splits", {}).get(split)
            if name not in histories and validation and key in validation:
                ax.axhline(
                    validation[key], linestyle="--", color=colours[name], linewidth=1, label=f"{name} (no training)"
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {'R@1 (%)' if key == 'R1' else 'SumR'}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"Model selection on the {split} split (star: the selected epoch)")
    return save(figure, path, dpi)


def training_history(base: BaseConfig, name: str) -> dict[str, Any] | None:
    """{"rows": [{"epoch" (1-based), "R1", "SumR"}], "best_epoch", "split"} of a model, or None without one."""
    if not _registered(name):
        return None
    if model_spec(name).inputs == "frames":
        path = base.dataset_metrics / f"{name}_history.tsv"
        if not path.is_file():
            return None
        with path.open() as handle:
            records = [r for r in csv.DictReader(handle, delimiter="\t") if r.get("select_SumR")]
        rows = [
            {"epoch": int(r["epoch"]), "R1": float(r["select_R1"]), "SumR": float(r["select_SumR"])} for r in records
        ]
        best = max(rows, key=lambda row: row["SumR"])["epoch"] if rows else None
        return {"rows": rows, "best_epoch": best, "split": records[0]["split"]} if rows else None
    path = baseline_dir(base, name) / "training.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    rows = [
        {"epoch": int(r["epoch"]) + 1, "R1": float(r["R1"]), "SumR": float(r["SumR"])}
        for r in record.get("history", [])
        if "SumR" in r
    ]
    if not rows:  # a reference with nothing to train
        return None
    best = record.get("best_epoch")
    return {"rows": rows, "best_epoch": None if best is None else best + 1, "split": record.get("select_split", "val")}


def efficiency_tradeoff(results: dict[str, dict[str, Any]], path: Path, dpi: int) -> Path | None:
    """SumR against bytes stored per video and against total ms per query at the largest probed corpus."""
    measured = {name: r for name, r in results.items() if r.get("efficiency", {}).get("bytes_per_video")}
    if not measured:
        return None
    figure, axes = new_figure(1, 2, (11, 4.4))
    colours = model_colours(results)
    sizes = set()
    for name, result in sorted(measured.items()):
        efficiency = result["efficiency"]
        y, yerr = result["SumR"], _error_bar(result, "SumR")
        axes[0].errorbar(
            efficiency["bytes_per_video"], y, yerr=yerr, fmt="o", capsize=3, color=colours[name], label=name
        )
        times = efficiency.get("total_ms_per_query", {})
        if times:
            size = max(times, key=int)
            sizes.add(size)
            spread = efficiency.get("total_ms_per_query_iqr", {}).get(size, 0.0) / 2
            axes[1].errorbar(times[size], y, xerr=spread, yerr=yerr, fmt="o", capsize=3, color=colours[name])
    axes[0].set_xlabel("bytes stored per video (log scale)")
    corpus = "/".join(sorted(sizes, key=int)) or "?"
    axes[1].set_xlabel(f"total ms per query, encoding + matching, @ {corpus} videos (log scale)")
    for ax in axes:
        ax.set_xscale("log")
        ax.margins(x=0.2)
        ax.set_ylabel("SumR")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize="small")  # a legend, not labels at the points: close models' labels would overlap
    device = sorted({r["efficiency"].get("device", "?") for r in measured.values()})
    figure.suptitle(
        f"Accuracy against storage and latency (timings on {', '.join(device)}; bars: SumR's 95 % interval, time IQR)"
    )
    return save(figure, path, dpi)


def recall_vs_corpus_size(results: dict[str, dict[str, Any]], path: Path, dpi: int) -> Path | None:
    """Expected R@1, R@10 and SumR on random sub-corpora of each size, from the per-query ranks."""
    ranked = {name: r for name, r in results.items() if r.get("ranks") and r.get("num_videos", 0) > 1}
    if not ranked:
        return None
    figure, axes = new_figure(1, 3, (14, 4.2))
    colours = model_colours(results)
    for name, result in sorted(ranked.items()):
        num_videos = int(result["num_videos"])
        sizes = sorted({int(s) for s in np.geomspace(2, num_videos, 24).round()} | {num_videos})
        curves = recall_at_corpus_sizes(np.asarray(result["ranks"]), num_videos, sizes)
        sumr = np.sum([curves[f"R{k}"] for k in (1, 5, 10, 100)], axis=0)
        for ax, values in zip(axes, (curves["R1"], curves["R10"], sumr), strict=True):
            ax.plot(sizes, values, label=name, color=colours[name])
    largest = max(int(r["num_videos"]) for r in ranked.values())
    sizes = np.geomspace(2, largest, 48)
    axes[0].plot(sizes, 100.0 / sizes, linestyle="--", color="grey", linewidth=1, label="chance")
    for ax, label in zip(axes, ("R@1 (%)", "R@10 (%)", "SumR"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("videos in the corpus (log scale)")
        ax.set_ylabel(f"expected {label}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    split = sorted({r.get("split", "?") for r in ranked.values()})
    figure.suptitle(f"Recall against corpus size ({'/'.join(split)} split; random sub-corpora keeping the answer)")
    return save(figure, path, dpi)


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------


def _error_bar(result: dict[str, Any], key: str) -> np.ndarray | None:
    interval = result.get("ci", {}).get(key)
    if not interval:
        return None
    return np.array([[result[key] - interval[0]], [interval[1] - result[key]]]).clip(0.0, None)


def _registered(name: str) -> bool:
    return name in available_models()


def _reads_frames(name: str) -> bool:
    return _registered(name) and model_spec(name).inputs == "frames"
