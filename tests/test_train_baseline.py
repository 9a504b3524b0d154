"""The baseline stages: train on a feature store, save, reload and evaluate with the shared protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStoreInfo, FeatureStoreWriter
from stages.data.schema import Query, write_queries
from stages.evaluate.evaluator import EvalConfig, EvaluateConfig
from stages.train.baseline_training import BaselineTrainConfig
from stages.train.train_baseline import BaselineStageConfig, run_evaluate_baseline, run_train_baseline

DIM = 16
PROTOCOL = EvaluateConfig(EvalConfig(split="test", moment_retrieval=False, measure_efficiency=False), batch_videos=5)


@pytest.fixture()
def base(tmp_path) -> BaseConfig:
    """12 videos per split; each query's EOT token feature is (a noisy copy of) one frame of its video."""
    base = BaseConfig(
        dataset="toy", cache_dir=str(tmp_path / "cache"), metrics_dir=str(tmp_path / "metrics"), clip_arch="toy"
    )
    rng = np.random.default_rng(0)
    info = FeatureStoreInfo("toy", "0" * 64, "3.3.0", "last", "none", "toy")
    queries = []
    with FeatureStoreWriter(base.features_path(), info) as store:
        for split in ("train", "val", "test"):
            for v in range(12):
                video_id = f"{split}{v}"
                frames = rng.normal(size=(int(rng.integers(6, 20)), DIM)).astype(np.float32)
                store.write("video", video_id, frames)
                for k in range(2):
                    query_id = f"{video_id}#{k}"
                    tokens = rng.normal(size=(int(rng.integers(3, 8)), DIM)).astype(np.float32)
                    tokens[-1] = frames[int(rng.integers(len(frames)))] + 0.01 * rng.normal(size=DIM)
                    store.write("text", query_id, tokens)
                    queries.append(Query(query_id, f"caption {k}", video_id, 10.0, ((0.0, 5.0),), split))
    write_queries(base.annotations_path, queries)
    return base


def test_frozen_clip_mil_finds_the_matching_frame(base: BaseConfig) -> None:
    metrics = run_evaluate_baseline(base, "clip_mil", BaselineStageConfig(), PROTOCOL)
    assert metrics["R1"] == 100.0 and metrics["split"] == "test" and metrics["num_videos"] == 12
    saved = json.loads((base.dataset_metrics / "clip_mil.json").read_text())
    assert saved["feature_source"] == "clip_toy.h5" and saved["selection"]["rule"].startswith("none")


def test_train_save_reload_evaluate_msl(base: BaseConfig) -> None:
    cfg = BaselineStageConfig(
        model={"hidden_size": 32, "n_heads": 2, "max_ctx_l": 16, "max_desc_l": 8, "map_size": 4},
        train=BaselineTrainConfig(n_epoch=2, batch_size=6, hard_negative_start_epoch=1, eval_video_batch=6),
    )
    with pytest.raises(PipelineError, match="no trained model"):
        run_evaluate_baseline(base, "msl", cfg, PROTOCOL)
    out = run_train_baseline(base, "msl", cfg)
    first = load_file(str(out / "model.safetensors"))
    again = load_file(str(run_train_baseline(base, "msl", cfg) / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed, same weights
    record = json.loads((out / "training.json").read_text())
    assert record["model_config"]["visual_input_size"] == DIM and len(record["history"]) >= 1
    metrics = run_evaluate_baseline(base, "msl", cfg, PROTOCOL)
    assert 0.0 <= metrics["R1"] <= 100.0 and metrics["selection"]["split"] == "val"
    assert set(metrics["splits"]) == {"val"} and metrics["untrained"]["num_videos"] == 12
    changed = BaselineStageConfig(model={**cfg.model, "hidden_size": 64}, train=cfg.train)
    with pytest.raises(PipelineError, match="another model config"):
        run_evaluate_baseline(base, "msl", changed, PROTOCOL)
    with pytest.raises(PipelineError, match="unknown model"):
        run_train_baseline(base, "no_such_model", cfg)
    reference = json.loads((run_train_baseline(base, "clip_mil", cfg) / "training.json").read_text())
    assert reference["trained"] is False and not (out.parent / "clip_mil" / "model.safetensors").exists()
