"""BertAdam, the warm-up-linear schedule, early stopping and the baseline training function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStore, FeatureStoreInfo, FeatureStoreWriter
from stages.data.schema import Query
from stages.models.baselines.gmmformer import GMMFormer, GMMFormerConfig
from stages.models.baselines.msl import MSSL, MSSLConfig
from stages.train.baseline_training import BaselineDatasets, BaselineTrainConfig, EarlyStopping, train_baseline
from stages.train.bert_adam import BertAdam, bert_param_groups, warmup_linear


def test_warmup_linear_schedule() -> None:
    assert warmup_linear(0.0, 0.01) == 0.0
    assert warmup_linear(0.005, 0.01) == pytest.approx(0.5)
    assert warmup_linear(0.01, 0.01) == pytest.approx(1.0)
    assert warmup_linear(0.505, 0.01) == pytest.approx(0.5)
    assert warmup_linear(1.0, 0.01) == 0.0 and warmup_linear(1.3, 0.01) == 0.0


def test_bert_adam_step_matches_the_formula() -> None:
    param = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5: clipped to norm 1 per tensor
    optimizer = BertAdam([param], lr=0.1, weight_decay=0.01, max_grad_norm=1.0)
    param.grad = grad.clone()
    optimizer.step()
    clipped = grad / 5.0
    m, v = 0.1 * clipped, 0.001 * clipped**2
    expected = torch.tensor([1.0, -2.0, 0.5]) - 0.1 * (m / (v.sqrt() + 1e-6) + 0.01 * torch.tensor([1.0, -2.0, 0.5]))
    torch.testing.assert_close(param.detach(), expected)


def test_bert_adam_schedule_and_groups() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model.register_module("LayerNorm", nn.LayerNorm(3))
    groups = bert_param_groups(model, 0.01)
    # official rule, by name: biases and `LayerNorm.*` are not decayed (an unnamed LayerNorm's weight `1.weight` is)
    assert [len(g["params"]) for g in groups] == [2, 4] and groups[1]["weight_decay"] == 0.0
    param = nn.Parameter(torch.ones(2))
    optimizer = BertAdam([param], lr=1.0, warmup=0.5, t_total=4)
    lrs = []
    for step in range(5):
        lrs.append(optimizer.scheduled_lr(optimizer.param_groups[0], step))
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    param.grad = torch.ones(2)
    optimizer.step()  # the first official step has learning rate 0
    torch.testing.assert_close(param.detach(), torch.ones(2))


def test_early_stopping_counts_strict_improvements() -> None:
    stopper = EarlyStopping(patience=1)
    assert stopper.update(10.0, 0) and not stopper.update(10.0, 1) and not stopper.should_stop
    assert not stopper.update(9.0, 2) and stopper.should_stop and stopper.best_epoch == 0


def _synthetic_store(path: Path, videos: int = 10, dim: int = 12) -> tuple[FeatureStore, list[Query]]:
    """Videos whose frames drift around a per-video direction; each query is a noisy copy of part of its video."""
    rng = np.random.default_rng(0)
    info = FeatureStoreInfo("synthetic", "0" * 64, "none", "last", "none", "synthetic")
    queries = []
    with FeatureStoreWriter(path, info) as writer:
        for v in range(videos):
            centre = rng.standard_normal(dim)
            frames = centre + 0.3 * rng.standard_normal((int(rng.integers(5, 20)), dim))
            writer.write("video", f"vid{v}", frames.astype(np.float32))
            for k, split in enumerate(("train", "train", "val")):
                tokens = frames[: int(rng.integers(2, 6))] + 0.2 * rng.standard_normal((1, dim))
                writer.write("text", f"vid{v}#{k}", tokens.astype(np.float32))
                queries.append(Query(f"vid{v}#{k}", "q", f"vid{v}", 10.0, (), split))
    return FeatureStore(path), queries


@pytest.mark.parametrize("model_cls, cfg_cls", [(MSSL, MSSLConfig), (GMMFormer, GMMFormerConfig)])
def test_train_baseline_selects_the_best_epoch(tmp_path: Path, model_cls: type, cfg_cls: type) -> None:
    store, queries = _synthetic_store(tmp_path / "f.h5")
    cfg = cfg_cls(visual_input_size=12, query_input_size=12, hidden_size=16, max_ctx_l=8, max_desc_l=6, map_size=4)
    datasets = BaselineDatasets.from_annotations(queries, store.videos, store.texts, cfg.preprocess())
    assert len(datasets.train) == 10 and len(datasets.val_queries) == 10
    with pytest.raises(PipelineError, match="no features"):
        BaselineDatasets.from_annotations(
            [*queries, Query("x#0", "q", "x", 1.0, (), "val")], store.videos, store.texts, cfg.preprocess()
        )
    torch.manual_seed(0)
    model = model_cls(cfg)
    train_cfg = BaselineTrainConfig(
        lr=2e-3, n_epoch=6, batch_size=4, hard_negative_start_epoch=3, max_es_cnt=1, device="cpu", eval_query_batch=4
    )
    result = train_baseline(model, datasets, train_cfg, progress=False)
    sumr = [h["SumR"] for h in result.history]
    assert 2 <= len(result.history) <= 6
    assert result.best_epoch == int(np.argmax(sumr)) and result.best_metrics["SumR"] == max(sumr)
    assert all(np.isfinite(h["total"]) for h in result.history)
    assert result.state_dict.keys() == model.state_dict().keys()
    assert min(h["total"] for h in result.history[1:]) < result.history[0]["total"]  # it learns
    assert result.best_metrics["R1"] >= 50.0  # chance is 10 (10 validation videos)
