"""Train and evaluate the feature baselines (MS-SL, GMMFormer, Prototypes) and the frozen-CLIP MIL reference.

    python pipeline.py train-baseline msl            # one baseline, settings from params.yaml `baselines.msl`
    python pipeline.py evaluate msl                  # metrics/<dataset>/msl.json
    dvc repro train_baseline@msl evaluate@msl
    dvc exp run -S baselines.prototypes.model.num_prototypes=10   # Prototypes Table 5

Each entry of the `baselines` section names a registered model (the entry's key), its model config (`model`, the
keys of the model's config dataclass; feature sizes come from the feature store) and its training (`train`). The
trained weights, the resolved configs and the history go to `cache/<dataset>/baselines/<name>/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from stages.data.config import BaseConfig, config_from_dict
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStore
from stages.data.schema import read_queries
from stages.evaluate.evaluator import EvalConfig, EvaluateConfig, evaluate_encoder, ground_truth, write_metrics
from stages.evaluate.retrieval import resolve_device
from stages.train.baseline_training import BaselineDatasets, BaselineTrainConfig, train_baseline
from stages.train.models import build_model
from stages.train.models.baselines.base import BaselineConfig
from stages.train.models.baselines.data import QueryDataset, VideoDataset, collate_queries, collate_videos
from stages.train.models.baselines.gmmformer import GMMFormerConfig
from stages.train.models.baselines.msl import MSSLConfig
from stages.train.models.baselines.preprocessing import PreprocessConfig
from stages.train.models.baselines.prototypes import PrototypesConfig

MODEL_CONFIGS: dict[str, type[BaselineConfig]] = {
    "msl": MSSLConfig,
    "gmmformer": GMMFormerConfig,
    "prototypes": PrototypesConfig,
}
UNTRAINED = ("clip_mil",)  # references that are evaluated without training
MIL_PREPROCESS = PreprocessConfig(max_ctx_l=100_000, max_desc_l=1_000)  # every frame and token, L2-normalised


@dataclass(frozen=True)
class BaselineStageConfig:
    """One entry of the `baselines` section of params.yaml."""

    model: dict[str, Any] = field(default_factory=dict)  # keys of the model's config dataclass (see its module)
    train: BaselineTrainConfig = field(default_factory=BaselineTrainConfig)
    train_split: str = "train"
    select_split: str = "val"  # model selection (early stopping) split; `evaluate.protocol.split` is reported


def model_dir(base: BaseConfig, name: str) -> Path:
    """`cache/<dataset>/baselines/<name>`: weights, resolved configs, history."""
    return base.dataset_cache / "baselines" / name


def model_config(name: str, cfg: BaselineStageConfig, store: FeatureStore) -> BaselineConfig:
    """The typed model config of baseline `name`, with the input sizes of the feature store."""
    if name not in MODEL_CONFIGS:
        raise PipelineError(f"unknown baseline {name!r}; trainable baselines are {sorted(MODEL_CONFIGS)}")
    dim = _feature_dim(store)
    model = config_from_dict(MODEL_CONFIGS[name], cfg.model, f"baselines.{name}.model")
    return dataclasses.replace(model, visual_input_size=dim, query_input_size=dim)


def run_train_baseline(base: BaseConfig, name: str, cfg: BaselineStageConfig) -> Path:
    """Train baseline `name` on the feature store, select on `select_split`, save the best state; return its dir."""
    store = FeatureStore(base.features_path())
    config = model_config(name, cfg, store)
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
    out = model_dir(base, name)
    out.mkdir(parents=True, exist_ok=True)
    save_file(result.state_dict, str(out / "model.safetensors.tmp"))
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    record = {
        "model": name,
        "model_config": dataclasses.asdict(config),
        "train_config": dataclasses.asdict(train_cfg),
        "select_split": cfg.select_split,
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
        "history": result.history,
        "features": str(store.path),
        "features_weights_sha256": store.info.weights_sha256,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True))
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

    if name in UNTRAINED:
        evaluated = {q.video_id for q in annotations if q.split in splits}
        model: nn.Module = build_model(name, max_frames=max(store.videos.shape(v)[0] for v in evaluated))
        preprocess, selection, untrained = MIL_PREPROCESS, {"rule": "none (no training)"}, None
    else:
        model, preprocess, selection = _load_trained(base, name, cfg, store)
        torch.manual_seed(cfg.train.seed + base.seed)
        untrained = build_model(name, cfg=model_config(name, cfg, store)) if evaluation.untrained_reference else None
    headline = evaluation.protocol.split
    metrics = {"model": name, **score(model, preprocess, headline, evaluation.protocol)}
    metrics.update(feature_source=store.path.name, selection=selection)
    metrics["splits"] = {split: score(model, preprocess, split, quick) for split in evaluation.also_splits}
    if untrained is not None:
        metrics["untrained"] = score(untrained, preprocess, headline, quick)
    write_metrics(base.dataset_metrics / f"{name}.json", metrics)
    return metrics


def _load_trained(
    base: BaseConfig, name: str, cfg: BaselineStageConfig, store: FeatureStore
) -> tuple[nn.Module, PreprocessConfig, dict[str, Any]]:
    directory = model_dir(base, name)
    if not (directory / "model.safetensors").is_file():
        raise PipelineError(f"{directory} holds no trained model; run `python pipeline.py train-baseline {name}`")
    record = json.loads((directory / "training.json").read_text())
    config = config_from_dict(MODEL_CONFIGS[name], record["model_config"], f"{directory}/training.json")
    if config != model_config(name, cfg, store):
        raise PipelineError(f"{directory} was trained with another model config; re-run train-baseline {name}")
    model = build_model(name, cfg=config)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    selection = {"split": record["select_split"], "best_epoch": record["best_epoch"], "rule": "best SumR"}
    return model, config.preprocess(), selection


def _feature_dim(store: FeatureStore) -> int:
    first = next(iter(store.videos), None)
    if first is None:
        raise PipelineError(f"{store.path} holds no video features; run `python pipeline.py features`")
    return store.videos.shape(first)[1]
