"""Train and evaluate the feature baselines (every model of the registry that reads features).

    python pipeline.py train-baseline msl            # one baseline, settings from params.yaml `baselines.msl`
    torchrun --standalone --nproc_per_node=4 pipeline.py train-baseline msl   # 4 GPUs (DDP; same updates as one)
    python pipeline.py evaluate msl                  # metrics/<dataset>/msl.json
    dvc repro train_baseline@msl evaluate@msl
    dvc exp run -S baselines.prototypes.model.num_prototypes=10   # Prototypes Table 5

Each entry of the `baselines` section names a registered model (the entry's key), its model config (`model`, the
keys of the model's config dataclass; feature sizes come from the feature store) and its training (`train`). The
trained weights, the resolved configs and the history go to `cache/<dataset>/baselines/<name>/`, with `last.pt`
(written every epoch and every `train.checkpoint_every_steps` updates): a killed run started again with the same
configuration resumes where it was and ends with the same weights. A reference with nothing to train (frozen CLIP
MIL) records only that in `training.json`, so every entry has the same two stages.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from stages.data.available import AvailableQueries, available_queries
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStore
from stages.data.files import atomic_write_text
from stages.evaluate.evaluator import EvalConfig, EvaluateConfig, evaluate_encoder, ground_truth, write_metrics
from stages.evaluate.retrieval import resolve_device
from stages.models import build_model, model_spec
from stages.models.baselines.base import BaselineConfig
from stages.models.baselines.data import QueryDataset, VideoDataset, collate_queries, collate_videos
from stages.models.baselines.preprocessing import PreprocessConfig
from stages.models.trained import (
    baseline_config,
    baseline_dir,
    baseline_selection,
    load_baseline,
    load_trained_baseline,
    save_baseline,
)
from stages.train.baseline_training import (
    RUNTIME_KEYS,
    BaselineDatasets,
    BaselineTrainConfig,
    BaselineTrainResult,
    train_baseline,
)
from stages.train.distributed import distributed_run, is_main_process, log_main
from stages.train.resume import RunCheckpoint, run_fingerprint


@dataclass(frozen=True)
class BaselineStageConfig:
    """One entry of the `baselines` section of params.yaml."""

    model: dict[str, Any] = field(default_factory=dict)  # keys of the model's config dataclass (see its module)
    train: BaselineTrainConfig = field(default_factory=BaselineTrainConfig)
    train_split: str = "train"  # the split trained on
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
    splits = dict.fromkeys((cfg.train_split, cfg.select_split))
    keys = {cfg.train_split: f"baselines.{name}.train_split", cfg.select_split: f"baselines.{name}.select_split"}
    used = [_available(base, split, keys[split], f"train_baseline {name}") for split in splits]
    datasets = BaselineDatasets.from_annotations(
        [query for available in used for query in available.queries],
        store.videos,
        store.texts,
        config.preprocess(),
        train_split=cfg.train_split,
        val_split=cfg.select_split,
    )
    with distributed_run(train_cfg.device) as (world, _):
        torch.manual_seed(train_cfg.seed)  # the initial weights, like everything after, follow from the seed
        model = build_model(name, cfg=config)
        trained = [f"{v}:{','.join(q)}" for v, q in datasets.train.query_ids_by_video.items()]
        identity = {"model": name, "model_config": dataclasses.asdict(config), "select_split": cfg.select_split}
        items = [*trained, *datasets.val_queries.query_ids]
        fingerprint = run_fingerprint(
            train_cfg, RUNTIME_KEYS, "batch_size", world, items, features=store.info.weights_sha256, **identity
        )
        checkpoint = RunCheckpoint(out / "last.pt", fingerprint, f"train_baseline {name}")
        result = train_baseline(model, datasets, train_cfg, checkpoint=checkpoint)
        if not result.finished:
            log_main(f"train_baseline {name}: stopped at max_steps; run again to resume from {out / 'last.pt'}")
        elif is_main_process():
            _save_result(out, name, config, train_cfg, cfg.select_split, store, result)
    return out


def _save_result(
    out: Path,
    name: str,
    config: BaselineConfig,
    train_cfg: BaselineTrainConfig,
    select_split: str,
    store: FeatureStore,
    result: BaselineTrainResult,
) -> None:
    """The selected weights (`model.safetensors`) and `training.json` (configs, selection, history)."""
    record = {
        "model": name,
        "trained": True,
        "model_config": dataclasses.asdict(config),
        "train_config": dataclasses.asdict(train_cfg),
        "select_split": select_split,
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
        "history": result.history,
        "features": str(store.path),
        "features_weights_sha256": store.info.weights_sha256,
    }
    save_baseline(out, result.state_dict, record)


def run_evaluate_baseline(
    base: BaseConfig,
    name: str,
    cfg: BaselineStageConfig,
    evaluation: EvaluateConfig,
    checkpoint: str | Path | None = None,
    metrics_path: str | Path | None = None,
) -> dict:
    """Evaluate baseline `name` with the shared protocol and write metrics/<dataset>/<name>.json (or `metrics_path`).

    Like ProPy's file: the headline split at the top level, `evaluation.also_splits` under `splits`, and the same
    architecture at initialisation (same seed) under `untrained` when `evaluation.untrained_reference` is set.
    `checkpoint` evaluates the baseline saved in that directory (e.g. by `import-checkpoint`) with its own config
    instead of the trained one.
    """
    keys = {split: "evaluate.also_splits" for split in evaluation.also_splits}
    keys[evaluation.protocol.split] = "evaluate.protocol.split"
    available = {split: _available(base, split, key, f"evaluate {name}") for split, key in keys.items()}
    store = FeatureStore(base.features_path())
    device = resolve_device(evaluation.protocol.scoring.device)
    if evaluation.threads:
        torch.set_num_threads(evaluation.threads)
    quick = dataclasses.replace(evaluation.protocol, measure_efficiency=False)

    def score(model: nn.Module, preprocess: PreprocessConfig, split: str, protocol: EvalConfig) -> dict[str, Any]:
        queries, video_ids = available[split].queries, available[split].video_ids
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
        return {**evaluate_encoder(model.to(device), *batches, gt, protocol, module=model), **available[split].counts()}

    if checkpoint is not None and not model_spec(name).trainable:
        raise PipelineError(f"{name} has no weights: evaluate it without --checkpoint")
    if not model_spec(name).trainable:
        evaluated = {video_id for split in available.values() for video_id in split.video_ids}
        model: nn.Module = build_model(name, max_frames=max(store.videos.shape(v)[0] for v in evaluated))
        preprocess, selection, untrained = model.preprocess_config(), {"rule": "none (no training)"}, None
    elif checkpoint is not None:
        model, config, record = load_baseline(checkpoint, name)
        dims = (config.visual_input_size, config.query_input_size)
        if _feature_dims(store) != dims:
            raise PipelineError(
                f"{checkpoint} reads features of sizes (video, text) {dims}, {store.path} holds {_feature_dims(store)}"
            )
        selection, preprocess = baseline_selection(record), config.preprocess()
    else:
        config = baseline_config(name, cfg.model, _feature_dim(store))
        model, selection = load_trained_baseline(baseline_dir(base, name), config)
        preprocess = config.preprocess()
    if model_spec(name).trainable:
        torch.manual_seed(cfg.train.seed + base.seed)
        untrained = build_model(name, cfg=config) if evaluation.untrained_reference else None
    headline = evaluation.protocol.split
    metrics = {"model": name, **score(model, preprocess, headline, evaluation.protocol)}
    metrics.update(feature_source=store.path.name, selection=selection)
    metrics["splits"] = {split: score(model, preprocess, split, quick) for split in evaluation.also_splits}
    if untrained is not None:
        metrics["untrained"] = score(untrained, preprocess, headline, quick)
    write_metrics(metrics_path or base.dataset_metrics / f"{name}.json", metrics)
    return metrics


def _available(base: BaseConfig, split: str, key: str, stage: str) -> AvailableQueries:
    """The available queries of `split` (named by params `key`), what was left out logged for `stage`."""
    available = available_queries(base, split, key)
    available.log(stage, f"split {split!r}")
    return available


def _feature_dim(store: FeatureStore) -> int:
    return _feature_dims(store)[0]


def _feature_dims(store: FeatureStore) -> tuple[int, int]:
    """(video, text) feature sizes of the store."""
    video, text = next(iter(store.videos), None), next(iter(store.texts), None)
    if video is None or text is None:
        raise PipelineError(f"{store.path} holds no video or text features; run `python pipeline.py features`")
    return store.videos.shape(video)[1], store.texts.shape(text)[1]
