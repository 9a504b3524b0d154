"""Training of the feature-based baselines (MS-SL, GMMFormer, ...) with the official optimiser and model selection.

    result = train_baseline(model, BaselineDatasets.from_annotations(queries, store.videos, store.texts, pre),
                            BaselineTrainConfig())
    model.load_state_dict(result.state_dict)

Per epoch: one pass over the training videos in shuffled batches of `batch_size` videos with all their queries (the
last, smaller batch included, as officially); BertAdam with warm-up-linear over the nominal `n_epoch` horizon;
negatives from the hardest pool from `hard_negative_start_epoch` on; then the validation split is scored by the
shared evaluator and the state with the strictly best `select_metric` is kept. Training stops once more than
`max_es_cnt` consecutive epochs did not improve. Any `BaselineModel` (`stages.models.baselines.base`) can be trained.

The loop is ProPy's (`stages.train.loop.Trainer`). With a `RunCheckpoint`, `last.pt` is written after every epoch
and every `checkpoint_every_steps` updates, and a killed run started again resumes exactly: the same weights as an
uninterrupted run. Under torchrun each rank trains on its slice of every global batch inside torch DDP: the global
batch is sorted and padded as one process would collate it and the models gather their encodings
(`TrainingStep.gather`), so that each update equals one process's on the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from stages.data.errors import PipelineError
from stages.data.schema import Query
from stages.evaluate.evaluator import EvalConfig, evaluate_encoder, ground_truth
from stages.evaluate.metrics import NO_INTERVALS
from stages.evaluate.retrieval import ScoringConfig
from stages.models.baselines.data import (
    FeatureSource,
    QueryDataset,
    TrainBatch,
    VideoDataset,
    VideoQueryDataset,
    collate_queries,
    collate_train,
    collate_videos,
)
from stages.models.baselines.losses import NegativeSampling
from stages.models.baselines.preprocessing import PreprocessConfig
from stages.train.bert_adam import BertAdam, WarmupLinear, bert_param_groups
from stages.train.distributed import (
    GlobalBatchSampler,
    broadcast_from_main,
    epoch_loader,
    gather_batch,
    global_max,
    is_main_process,
    resolve_device,
    world_info_from_env,
    wrap_ddp,
)
from stages.train.loop import LoopConfig, Trainer
from stages.train.resume import RunCheckpoint


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
    device: str = "auto"  # auto, cpu, cuda, cuda:K (under torchrun: each rank's LOCAL_RANK GPU)
    threads: int = 0  # torch CPU threads (0 = torch's default); on a busy 2-core CPU 1 thread is far faster
    checkpoint_every_steps: int = 0  # also write last.pt every N updates (0 = after each epoch only)
    max_steps: int = 0  # stop after N updates in total (time-boxing); running again resumes. 0 = no limit


# Keys that change how fast training runs or where it stops, not what it computes (left out of the fingerprint).
RUNTIME_KEYS = (
    "checkpoint_every_steps",
    "max_steps",
    "num_workers",
    "device",
    "threads",
    "eval_video_batch",
    "eval_query_batch",
)


class EarlyStopping:
    """Keep the best value of a metric (strictly greater wins) and stop after more than `patience` bad epochs."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        """Best value, its epoch and the count of epochs since (for resuming)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]

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
    best_epoch: int  # 0-based
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch (0-based): mean losses, validation
    finished: bool = True  # False when `max_steps` stopped training first (a later run resumes)


def validate(
    model: nn.Module, datasets: BaselineDatasets, cfg: BaselineTrainConfig, device: torch.device
) -> dict[str, float]:
    """PRVR metrics of the validation split, computed by the shared evaluator."""
    video_batches = DataLoader(datasets.val_videos, cfg.eval_video_batch, collate_fn=collate_videos)
    query_batches = DataLoader(datasets.val_queries, cfg.eval_query_batch, collate_fn=collate_queries)
    eval_cfg = EvalConfig(  # model selection reads the recalls only: no intervals, no moments, no timings
        split="val",
        scoring=ScoringConfig(device=str(device)),
        bootstrap=NO_INTERVALS,
        moment_retrieval=False,
        measure_efficiency=False,
    )
    batches = (b.to(device) for b in video_batches), (b.to(device) for b in query_batches)
    metrics = evaluate_encoder(model, *batches, datasets.val_gt, eval_cfg)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _padded_as_one_process(batch: TrainBatch, device: torch.device) -> TrainBatch:
    """This rank's batch padded to the global batch's longest frame sequence and query (what one process collates;
    GMMFormer's Gaussian masks, for one, depend on the padded length)."""
    frames, tokens = global_max([batch.videos.frame_feats.shape[1], batch.queries.query_feats.shape[1]], device)
    return batch.padded(frames, tokens)


def train_baseline(
    model: nn.Module,
    datasets: BaselineDatasets,
    cfg: BaselineTrainConfig,
    progress: bool = True,
    checkpoint: RunCheckpoint | None = None,
) -> BaselineTrainResult:
    """Train `model` on `datasets.train`, select on the validation split, return the best state and the history.

    Args:
        model: a baseline (`BaselineModel`: its forward gives the losses; `encode_videos`, `encode_queries`,
            `score_fn` for validation).
        datasets: training items and the validation split.
        cfg: optimiser, schedule, negatives, early stopping and checkpointing.
        progress: show a progress bar per epoch (stderr).
        checkpoint: where `last.pt` goes; resumed from when it was written by the same configuration.
    """
    world = world_info_from_env()
    device = resolve_device(cfg.device, world)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model.to(device)
    objective = wrap_ddp(model, device)
    rows = datasets.train.frame_rows()
    sampler = GlobalBatchSampler(len(rows), cfg.batch_size, world, cfg.seed, drop_last=False, sort_key=rows)
    total_steps = cfg.n_epoch * len(sampler)
    optimizer = BertAdam(
        bert_param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        warmup=cfg.warmup_proportion,
        t_total=total_steps,
        max_grad_norm=cfg.max_grad_norm,
    )
    schedule = WarmupLinear(cfg.lr, total_steps, cfg.warmup_proportion)
    loop = LoopConfig(cfg.n_epoch, len(sampler), 0.0, cfg.checkpoint_every_steps, cfg.max_steps, progress)
    trainer = Trainer([p for p in model.parameters() if p.requires_grad], optimizer, schedule, device, False, loop)
    negatives = torch.Generator().manual_seed(cfg.seed + 1)
    stopper = EarlyStopping(cfg.max_es_cnt)
    best: dict[str, Any] = {"state": {}, "metrics": {}}
    part_sums: dict[str, float] = {}

    def restore(state: dict[str, Any]) -> None:
        model.load_state_dict(state["weights"])
        negatives.set_state(state["negatives"])
        stopper.load_state_dict(state["stopper"])
        best.update(state["best"])
        part_sums.update(state["part_sums"])

    if checkpoint is not None:
        checkpoint.resume(trainer, restore)

    def batches(epoch: int, start: int) -> Iterator[TrainBatch]:
        model.train()
        options = {"collate_fn": collate_train, "num_workers": cfg.num_workers}
        yield from epoch_loader(datasets.train, sampler, epoch, start, **options)

    def loss_fn(batch: TrainBatch) -> tuple[torch.Tensor, int]:
        batch = _padded_as_one_process(batch.to(device), device)
        hard = trainer.progress.epoch >= cfg.hard_negative_start_epoch
        losses, _ = objective(batch, NegativeSampling(hard, cfg.hard_pool_size), negatives, gather=gather_batch)
        loss = losses["total"]
        if not torch.isfinite(loss):
            epoch = trainer.progress.epoch
            raise PipelineError(f"training diverged at epoch {epoch}: loss {loss.item()}; lower the lr")
        for name, value in losses.items():
            part_sums[name] = part_sums.get(name, 0.0) + float(value.detach())
        return loss, len(batch.videos.video_ids)

    def save() -> None:
        if checkpoint is not None:
            entries = {"stopper": stopper.state_dict(), "best": best, "part_sums": part_sums}
            checkpoint.save(trainer, weights=model.state_dict(), negatives=negatives.get_state(), **entries)

    def end_epoch(record: dict[str, Any]) -> dict[str, Any]:
        metrics = broadcast_from_main(validate(model, datasets, cfg, device) if is_main_process() else None)
        if cfg.select_metric not in metrics:
            raise PipelineError(f"select_metric {cfg.select_metric!r} is not one of {sorted(metrics)}")
        means = {name: value / len(sampler) for name, value in part_sums.items()}
        part_sums.clear()
        if stopper.update(metrics[cfg.select_metric], record["epoch"] - 1):
            best["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best["metrics"] = metrics
        if stopper.should_stop:
            trainer.stop()
        return {**means, **metrics}

    finished = trainer.finished or trainer.fit(batches, loss_fn, save, end_epoch)
    history = [{**record, "epoch": record["epoch"] - 1} for record in trainer.progress.history]
    return BaselineTrainResult(best["state"], stopper.best_epoch, best["metrics"], history, finished)
