"""Train and evaluate the feature baselines (every model of the registry that reads features).

    python pipeline.py train-baseline msl            # one baseline, settings from params.yaml `baselines.msl`
    python pipeline.py evaluate msl                  # metrics/<dataset>/msl.json
    dvc repro train_baseline@msl evaluate@msl
    dvc exp run -S baselines.prototypes.model.num_prototypes=10   # Prototypes Table 5

Each entry of the `baselines` section names a registered model (the entry's key), its model config (`model`, the
keys of the model's config dataclass; feature sizes come from the feature store) and its training (`train`). The
trained weights, the resolved configs and the history go to `cache/<dataset>/baselines/<name>/`. A reference with
nothing to train (frozen CLIP MIL) records only that in `training.json`, so every entry has the same two stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStore
from stages.data.files import atomic_write_text
from stages.data.schema import read_queries
from stages.evaluate.evaluator import EvalConfig, EvaluateConfig, evaluate_encoder, ground_truth, write_metrics
from stages.evaluate.retrieval import resolve_device
from stages.models import build_model, model_spec
from stages.models.baselines.data import QueryDataset, VideoDataset, collate_queries, collate_videos
from stages.models.baselines.preprocessing import PreprocessConfig
from stages.models.trained import baseline_config, baseline_dir, load_trained_baseline
from stages.train.baseline_training import BaselineDatasets, BaselineTrainConfig, train_baseline


@dataclass(frozen=True)
class BaselineStageConfig:
    """One entry of the `baselines` section of params.yaml."""

    model: dict[str, Any] = field(default_factory=dict)  # keys of the model's config dataclass (see its module)
    train: BaselineTrainConfig = field(default_factory=BaselineTrainConfig)
    train_split: str = "train"
    select_split: str = "val"  # model selection (early stopping) split; `evaluate.protocol.split` is reported


def run_train_baseline(base: BaseConfig, name: str, cfg: BaselineStageConfig) -> Path:
    """Train baseline `name` on the feature store, select on `select_split`, save the best state; return its dir."""
    out = baseline_dir(base, name)
    out.mkdir(parents=True, exist_ok=True)
    if not model_spec(name).trainable:
        record = {"model": name, "trained": False, "note": "a reference evaluated as it is: nothing to train"}
        atomic_write_text(out / "training.json", json.dumps(record, indent=2, sort_keys=True))
        return out
    store = FeatureStore(base.features_path())
    config = baseline_config(name, cfg.model, _feature_dim(store))
    train_cfg = dataclasses.replace(cfg.train, seed=cfg.train.seed + base.seed)
    torch.manual_seed(train_cfg.seed)  # the initial weights, like everything after, follow from the seed
    model = build_model(name, cfg=config)
    datasets = BaselineDatasets.from_annotations(
        read_queries(base.annotations_path),
        store.videos,
        store.texts,
        config.preprocess(),
        train_split=cfg.train_split,
        val_split=cfg.select_split,
    )
    result = train_baseline(model, datasets, train_cfg)
    save_file(result.state_dict, str(out / "model.safetensors.tmp"))
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    record = {
        "model": name,
        "trained": True,
        "model_config": dataclasses.asdict(config),
        "train_config": dataclasses.asdict(train_cfg),
        "select_split": cfg.select_split,
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
        "history": result.history,
        "features": str(store.path),
        "features_weights_sha256": store.info.weights_sha256,
    }
    atomic_write_text(out / "training.json", json.dumps(record, indent=2, sort_keys=True))
    return out


def run_evaluate_baseline(base: BaseConfig, name: str, cfg: BaselineStageConfig, evaluation: EvaluateConfig) -> dict:
    """Evaluate baseline `name` with the shared protocol and write metrics/<dataset>/<name>.json.

    Like ProPy's file: the headline split at the top level, `evaluation.also_splits` under `splits`, and the same
    architecture at initialisation (same seed) under `untrained` when `evaluation.untrained_reference` is set.
    """
    store = FeatureStore(base.features_path())
    device = resolve_device(evaluation.protocol.scoring.device)
    quick = dataclasses.replace(evaluation.protocol, measure_efficiency=False)
    annotations = read_queries(base.annotations_path)
    splits = (evaluation.protocol.split, *evaluation.also_splits)

    def score(model: nn.Module, preprocess: PreprocessConfig, split: str, protocol: EvalConfig) -> dict[str, Any]:
        queries = [q for q in annotations if q.split == split]
        if not queries:
            raise PipelineError(f"no queries in split {split!r}; check evaluate.protocol.split and also_splits")
        video_ids = list(dict.fromkeys(q.video_id for q in queries))
        gt, _ = ground_truth(queries, video_ids)
        videos = DataLoader(
            VideoDataset(video_ids, store.videos, preprocess), evaluation.batch_videos, collate_fn=collate_videos
        )
        texts = DataLoader(
            QueryDataset([q.query_id for q in queries], store.texts, preprocess),
            evaluation.batch_queries,
            collate_fn=collate_queries,
        )
        batches = (b.to(device) for b in videos), (b.to(device) for b in texts)
        return evaluate_encoder(model.to(device), *batches, gt, protocol, module=model)

    if not model_spec(name).trainable:
        evaluated = {q.video_id for q in annotations if q.split in splits}
        model: nn.Module = build_model(name, max_frames=max(store.videos.shape(v)[0] for v in evaluated))
        preprocess, selection, untrained = model.preprocess_config(), {"rule": "none (no training)"}, None
    else:
        config = baseline_config(name, cfg.model, _feature_dim(store))
        model, selection = load_trained_baseline(baseline_dir(base, name), config)
        preprocess = config.preprocess()
        torch.manual_seed(cfg.train.seed + base.seed)
        untrained = build_model(name, cfg=config) if evaluation.untrained_reference else None
    headline = evaluation.protocol.split
    metrics = {"model": name, **score(model, preprocess, headline, evaluation.protocol)}
    metrics.update(feature_source=store.path.name, selection=selection)
    metrics["splits"] = {split: score(model, preprocess, split, quick) for split in evaluation.also_splits}
    if untrained is not None:
        metrics["untrained"] = score(untrained, preprocess, headline, quick)
    write_metrics(base.dataset_metrics / f"{name}.json", metrics)
    return metrics


def _feature_dim(store: FeatureStore) -> int:
    first = next(iter(store.videos), None)
    if first is None:
        raise PipelineError(f"{store.path} holds no video features; run `python pipeline.py features`")
    return store.videos.shape(first)[1]
