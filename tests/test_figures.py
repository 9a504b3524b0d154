"""The figures stage on a toy ProPy run: every PNG is written, ProPy's attention maps are read correctly and only
for the videos drawn, and the history and efficiency figures take every model found in the metrics folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.data.config import BaseConfig
from stages.data.frame_cache import FrameCache
from stages.data.frame_dataset import FrameDataset
from stages.evaluate.evaluator import EvaluateConfig
from stages.evaluate.figures import FiguresConfig, run_figures, training_history
from stages.evaluate.metrics import prvr_metrics_from_ranks
from stages.evaluate.propy_figures import PropyFiguresConfig, PropyInputs, attention_maps
from stages.models.propy import ProPy
from stages.models.trained import baseline_dir, load_trained_propy
from stages.train.train_propy import run_evaluate_propy, run_train_propy
from tests.test_train_propy import TOY, make_dataset

INPUTS = PropyInputs(split="test", max_words=TOY.max_words, tail_fix=TOY.tail_fix, device="cpu", batch_videos=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_clip_weights: Path) -> BaseConfig:
    """A toy ProPy trained for 2 epochs and evaluated, and a baseline's training record beside it."""
    base = make_dataset(tmp_path_factory.mktemp("figures"), tiny_clip_weights)
    run_train_propy(base, TOY)
    evaluation = EvaluateConfig()
    efficiency = replace(evaluation.protocol.efficiency, corpus_sizes=(20, 50), repeats=2)
    run_evaluate_propy(base, TOY, replace(evaluation, protocol=replace(evaluation.protocol, efficiency=efficiency)))
    history = [{"epoch": e, "R1": 10.0 + e, "SumR": 100.0 + 5 * e, "total": 1.0} for e in range(3)]
    record = {"model": "msl", "trained": True, "best_epoch": 2, "select_split": "val", "history": history}
    baseline_dir(base, "msl").mkdir(parents=True)
    (baseline_dir(base, "msl") / "training.json").write_text(json.dumps(record))
    propy = json.loads((base.dataset_metrics / "propy.json").read_text())
    ranks = [min(r + 1, propy["num_videos"]) for r in propy["ranks"]]  # a worse model on the same queries
    msl = {**propy, **prvr_metrics_from_ranks(np.array(ranks)), "ranks": ranks}
    (base.dataset_metrics / "msl.json").write_text(json.dumps(msl))
    return base


def test_every_figure_is_a_png_and_attention_is_computed_only_for_the_drawn_videos(
    trained: BaseConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches_with_maps = []
    forward_visual = ProPy.forward_visual

    def spy(self: ProPy, frames: torch.Tensor, need_weights: bool = False):
        if need_weights:
            batches_with_maps.append(frames.shape[0])
        return forward_visual(self, frames, need_weights)

    monkeypatch.setattr(ProPy, "forward_visual", spy)
    cfg = FiguresConfig(output_dir=str(tmp_path), dpi=50, propy=PropyFiguresConfig(attention_queries=1))
    written = run_figures(trained, cfg, INPUTS)
    names = sorted(path.name for path in written)
    assert names == [
        "efficiency_tradeoff.png",
        "propy_attention_1.png",
        "propy_event_map.png",
        "propy_selected_events.png",
        "recall_vs_corpus_size.png",
        "training_curves.png",
    ]
    for path in written:
        assert path.parent == tmp_path / "toy"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 150
    assert batches_with_maps == [1]  # one video, the one drawn; the corpus was encoded without maps
    assert not list((tmp_path / "toy").glob("*.tmp.png"))


def test_attention_rows_are_read_at_the_right_columns(trained: BaseConfig) -> None:
    model, _ = load_trained_propy(trained, torch.device("cpu"))
    video = FrameDataset(FrameCache(trained.frames_path), ["test1"], model.pyramid.num_frames, train=False)[0][0]
    for event in range(model.pyramid.num_events):
        patches, events = attention_maps(model, video, event, -1, torch.device("cpu"))
        start, end = model.pyramid.spans[event]
        assert patches.shape == (model.pyramid.num_frames, 2, 2)  # 64 px frames, 32 px patches
        outside = torch.cat([patches[:start], patches[end:]])
        assert torch.all(outside == 0) and torch.all(patches[start:end] > 0)  # an event sees its segment only
        allowed = torch.from_numpy(model.pyramid.event_event_allowed[event])
        assert torch.all(events[~allowed] == 0) and events[event] > 0
        assert float(patches.sum() + events.sum()) < 1.0  # the rest: CLS tokens and visual prompts


def test_training_histories_are_discovered_per_model(trained: BaseConfig) -> None:
    propy = training_history(trained, "propy")
    assert [row["epoch"] for row in propy["rows"]] == [1, 2] and propy["split"] == "val"
    assert propy["best_epoch"] == max(propy["rows"], key=lambda row: row["SumR"])["epoch"]
    msl = training_history(trained, "msl")
    assert [row["epoch"] for row in msl["rows"]] == [1, 2, 3] and msl["best_epoch"] == 3  # 1-based like ProPy's
    assert training_history(trained, "gmmformer") is None  # registered, but no history here
    assert training_history(trained, "not_a_model") is None


def test_figures_without_propy_need_no_model(trained: BaseConfig, tmp_path: Path) -> None:
    metrics = BaseConfig(dataset="other", metrics_dir=str(tmp_path / "metrics"))
    metrics.dataset_metrics.mkdir(parents=True)
    result = json.loads((trained.dataset_metrics / "msl.json").read_text())
    (metrics.dataset_metrics / "msl.json").write_text(json.dumps(result))
    written = run_figures(metrics, FiguresConfig(output_dir=str(tmp_path / "out"), dpi=40), INPUTS)
    assert sorted(p.name for p in written) == ["efficiency_tradeoff.png", "recall_vs_corpus_size.png"]
    assert np.asarray(Image.open(written[0])).std() > 0  # something is drawn
