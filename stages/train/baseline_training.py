"""Training of the feature-based baselines (MS-SL, GMMFormer, ...) with the official optimiser and model selection.

    result = train_baseline(model, BaselineDatasets.from_annotations(queries, store.videos, store.texts, pre),
                            BaselineTrainConfig())
    model.load_state_dict(result.state_dict)

Per epoch: one pass over the training videos in shuffled batches of `batch_size` videos with all their queries;
BertAdam with warm-up-linear over the nominal `n_epoch` horizon; negatives from the hardest pool from
`hard_negative_start_epoch` on; then the validation split is scored by the shared evaluator and the state with the
strictly best `select_metric` is kept. Training stops once more than `max_es_cnt` consecutive epochs did not improve.
Any model with `training_loss(batch, sampling, generator) -> (loss, parts)` and the evaluator's encode/score
interface can be trained (see `stages.models.baselines.base`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from stages.data.errors import PipelineError
from stages.data.progress import progress_bar
from stages.data.schema import Query
from stages.evaluate.evaluator import EvalConfig, evaluate_encoder, ground_truth
from stages.evaluate.retrieval import ScoringConfig, resolve_device
from stages.models.baselines.data import (
    FeatureSource,
    QueryDataset,
    VideoDataset,
    VideoQueryDataset,
    collate_queries,
    collate_train,
    collate_videos,
)
from stages.models.baselines.losses import NegativeSampling
from stages.models.baselines.preprocessing import PreprocessConfig
from stages.train.bert_adam import BertAdam, bert_param_groups


@dataclass(frozen=True)
class BaselineTrainConfig:
    """Optimisation and model selection (defaults: the official MS-SL settings)."""

    lr: float = 2.5e-4  # peak learning rate (GMMFormer TVR: 3e-4)
    n_epoch: int = 100  # nominal horizon of the schedule and the maximum number of epochs
    batch_size: int = 128  # videos per batch (each with all of its queries)
    warmup_proportion: float = 0.01  # fraction of the horizon spent warming up
    weight_decay: float = 0.01  # decoupled, not applied to biases and LayerNorm
    max_grad_norm: float = 1.0  # per-tensor gradient clipping inside BertAdam
    hard_negative_start_epoch: int = 20  # 0-based epoch from which negatives come from the hardest pool
    hard_pool_size: int = 20
    max_es_cnt: int = 10  # stop after more than this many consecutive epochs without improvement
    select_metric: str = "SumR"  # validation metric to maximise
    eval_video_batch: int = 200  # videos per encoding batch in validation
    eval_query_batch: int = 50  # queries per encoding batch in validation
    num_workers: int = 0  # DataLoader workers (the feature store re-opens per worker)
    seed: int = 2018
    device: str = "auto"  # auto, cpu, cuda, cuda:K


class EarlyStopping:
    """Keep the best value of a metric (strictly greater wins) and stop after more than `patience` bad epochs."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; True when it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether more than `patience` consecutive epochs failed to improve."""
        return self.bad_epochs > self.patience


@dataclass
class BaselineDatasets:
    """Training items and the validation split."""

    train: VideoQueryDataset
    val_videos: VideoDataset
    val_queries: QueryDataset
    val_gt: torch.Tensor  # [N_q] index in `val_videos` of each validation query's video

    @classmethod
    def from_annotations(
        cls,
        queries: Sequence[Query],
        videos: FeatureSource,
        texts: FeatureSource,
        cfg: PreprocessConfig,
        train_split: str = "train",
        val_split: str = "val",
    ) -> BaselineDatasets:
        """Build both splits from unified annotations and feature sources (e.g. `FeatureStore.videos/.texts`)."""
        train = [q for q in queries if q.split == train_split]
        val = [q for q in queries if q.split == val_split]
        for name, split in ((train_split, train), (val_split, val)):
            if not split:
                raise PipelineError(f"no annotated queries in split {name!r}; check the `prepare` output")
        _check_available([q.video_id for q in train + val], videos, "video")
        _check_available([q.query_id for q in train + val], texts, "text")
        val_video_ids = list(dict.fromkeys(q.video_id for q in val))
        gt, _ = ground_truth(val, val_video_ids)
        return cls(
            train=VideoQueryDataset(train, videos, texts, cfg),
            val_videos=VideoDataset(val_video_ids, videos, cfg),
            val_queries=QueryDataset([q.query_id for q in val], texts, cfg),
            val_gt=gt,
        )


def _check_available(ids: Sequence[str], source: FeatureSource, what: str) -> None:
    missing = [item for item in dict.fromkeys(ids) if item not in source]
    if missing:
        raise PipelineError(
            f"{len(missing)} {what} id(s) of the annotations have no features, e.g. {missing[:3]}; "
            "re-run the `features` stage"
        )


@dataclass
class BaselineTrainResult:
    """The selected model and the training history."""

    state_dict: dict[str, torch.Tensor]  # CPU copy of the best state (by the validation metric)
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: mean losses and validation metrics


def validate(model: nn.Module, datasets: BaselineDatasets, cfg: BaselineTrainConfig) -> dict[str, float]:
    """PRVR metrics of the validation split, computed by the shared evaluator."""
    video_batches = DataLoader(datasets.val_videos, cfg.eval_video_batch, collate_fn=collate_videos)
    query_batches = DataLoader(datasets.val_queries, cfg.eval_query_batch, collate_fn=collate_queries)
    device = resolve_device(cfg.device)
    eval_cfg = EvalConfig(
        split="val", scoring=ScoringConfig(device=str(device)), moment_retrieval=False, measure_efficiency=False
    )
    batches = (b.to(device) for b in video_batches), (b.to(device) for b in query_batches)
    metrics = evaluate_encoder(model, *batches, datasets.val_gt, eval_cfg)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def train_baseline(
    model: nn.Module, datasets: BaselineDatasets, cfg: BaselineTrainConfig, progress: bool = True
) -> BaselineTrainResult:
    """Train `model` on `datasets.train`, select on the validation split, return the best state and the history.

    Args:
        model: a baseline (`training_loss`, `encode_videos`, `encode_queries`, `score_fn`).
        datasets: training items and the validation split.
        cfg: optimiser, schedule, negatives and early stopping.
        progress: show tqdm bars (stderr).
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    loader = DataLoader(
        datasets.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate_train,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    optimizer = BertAdam(
        bert_param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        warmup=cfg.warmup_proportion,
        t_total=cfg.n_epoch * len(loader),
        max_grad_norm=cfg.max_grad_norm,
    )
    negatives = torch.Generator().manual_seed(cfg.seed + 1)
    stopper = EarlyStopping(cfg.max_es_cnt)
    result = BaselineTrainResult({}, -1, {})
    for epoch in progress_bar(range(cfg.n_epoch), desc="epochs", unit="epoch", disable=not progress):
        sampling = NegativeSampling(hard=epoch >= cfg.hard_negative_start_epoch, pool_size=cfg.hard_pool_size)
        model.train()
        sums: dict[str, float] = {}
        for batch in progress_bar(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress):
            loss, parts = model.training_loss(batch.to(device), sampling, negatives)
            if not torch.isfinite(loss):
                raise PipelineError(f"training diverged at epoch {epoch}: loss {loss.item()}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        metrics = validate(model, datasets, cfg)
        if cfg.select_metric not in metrics:
            raise PipelineError(f"select_metric {cfg.select_metric!r} is not one of {sorted(metrics)}")
        result.history.append({"epoch": epoch, **{k: v / len(loader) for k, v in sums.items()}, **metrics})
        if stopper.update(metrics[cfg.select_metric], epoch):
            result.state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result.best_epoch, result.best_metrics = epoch, metrics
        if stopper.should_stop:
            break
    return result
