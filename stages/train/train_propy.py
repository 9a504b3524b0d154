"""The `train_propy` and `evaluate@propy` stages: train ProPy on the frame cache, then score it on held-out splits.

    python pipeline.py train-propy                              # one process (GPU if there is one, else CPU)
    python pipeline.py train-propy -s lr=1e-3 -s epochs=5       # override keys of the train_propy section
    torchrun --standalone --nproc_per_node=4 pipeline.py train-propy          # 4 GPUs of one machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        pipeline.py train-propy                                 # node 0 of 2 (node 1: --node_rank=1)
    srun python pipeline.py train-propy                         # SLURM (export MASTER_ADDR and MASTER_PORT)
    python pipeline.py evaluate propy                           # metrics/<dataset>/propy.json
    dvc repro evaluate@propy                                    # train (if needed) and evaluate
    dvc exp run -S train_propy.lr=9e-4                          # an experiment: re-runs training and evaluation only

Training follows the official code (docs/propy_official_code.md §4-6): batches of `batch_videos` videos per rank,
each with all its captions; the symmetric multi-positive InfoNCE over the MIL similarity of the global batch
(embeddings are all-gathered with gradients across ranks); AdamW with 10 % warm-up and a cosine schedule; gradient
clipping at 1.0; the official clamp of `logit_scale`; AMP on GPUs. Under torchrun the step runs in torch
DistributedDataParallel (see `stages.train.distributed`). Frames are read as uint8 from the cache and normalised on
the device. `python pipeline.py verify-reference propy-train PREFIX` runs `build_trainer` and
`PropyStep` against steps of the official loop.

Deliberate differences from the official loop are named options, official by default: `lr_floor` (the 1e-8 start
and floor of the schedule), `warmup_whole_steps` (the official warm-up length is not rounded) and
`decay_dead_parameters` (parameters that never get a gradient, the postfix projection and the last layer's adapter,
stay in AdamW, so their weights decay).

Outputs (`cache/<dataset>/propy/`): `last.pt` (everything needed to resume, written every epoch and every
`checkpoint_every_steps` updates) and `best.pt` (the selected epoch's trainable parameters and config); the
per-epoch history `metrics/<dataset>/propy_history.tsv` (a DVC plot). A killed run resumes where its last
checkpoint was when started again with the same configuration.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from stages.data.checkpoint import save_checkpoint
from stages.data.config import BaseConfig
from stages.data.corpus import Corpus, load_corpus
from stages.data.device import autocast_dtype
from stages.data.errors import PipelineError
from stages.data.frame_cache import FrameCache
from stages.data.frame_dataset import EncodedFrames, FrameDataset, Frames, collate_frames, stack_frames
from stages.data.schema import video_durations
from stages.evaluate.evaluator import EvalConfig, EvaluateConfig, evaluate_encoder, ground_truth, write_metrics
from stages.evaluate.metrics import NO_INTERVALS
from stages.models.clip_backbone import file_sha256, normalize_frames, tokenize
from stages.models.propy import ProPy, ProPyConfig, propy_loss
from stages.models.trained import PropyEncoder, build_propy, load_trained_propy, propy_dir
from stages.train.distributed import (
    GlobalBatchSampler,
    WorldInfo,
    barrier,
    distributed_run,
    epoch_loader,
    gather_embeddings,
    is_main_process,
    log_main,
    resolve_device,
    wrap_ddp,
)
from stages.train.loop import LoopConfig, Trainer
from stages.train.optim import LR_FLOOR, WarmupCosine, build_adamw
from stages.train.resume import RunCheckpoint, run_fingerprint

MODEL_NAME = "propy"
LOGIT_SCALE_RANGE = (0.1, 4.6052)  # the official in-place clamp of the (frozen) clip.logit_scale after every update
# Keys that change how fast training runs or where it stops, not what it computes: a checkpoint written under
# other values of these keys can be resumed.
_RUNTIME_KEYS = ("checkpoint_every_steps", "max_steps", "num_workers", "device", "eval_batch_videos", "threads")


@dataclass(frozen=True)
class TrainPropyConfig:
    """The `train_propy` section (paper values per dataset are listed in params.yaml)."""

    model: ProPyConfig = field(default_factory=ProPyConfig)  # structure; frames per video = model.pyramid.num_frames
    epochs: int = 10  # passes over the training videos
    batch_videos: int = 24  # videos per rank per step (each with all its captions); global batch = this x ranks
    lr: float = 8e-4  # peak learning rate
    warmup: float = 0.1  # fraction of all steps spent warming up linearly from 1e-8
    weight_decay: float = 0.2  # AdamW decay of every non-bias trainable parameter
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    lr_floor: float = LR_FLOOR  # official 1e-8: the warm-up starts there and the rate never falls below; 0: 0 to 0
    warmup_whole_steps: bool = False  # False = official (warm-up of warmup x steps, unrounded); True rounds it down
    decay_dead_parameters: bool = True  # True = official: never-used parameters stay in AdamW (their weights decay)
    max_words: int = 32  # tokens per caption, SOT and EOT included
    tail_fix: bool = False  # False = official TSN sampling (drops each video's last frames); True covers them
    train_split: str = "train"  # the split trained on
    select_split: str = "val"  # model selection: val | test (official behaviour) | last
    checkpoint_every_steps: int = 0  # also write last.pt every N updates (0 = after each epoch only)
    max_steps: int = 0  # stop after N updates in total (time-boxing); a later run resumes. 0 = no limit
    num_workers: int = 0  # DataLoader worker processes per rank
    device: str = "auto"  # auto | cpu | cuda (the local rank's GPU)
    amp: bool = True  # mixed precision on GPUs (bf16 where supported, else fp16 with a GradScaler)
    decode_on_device: bool = False  # JPEG caches: workers ship compressed frames, decoded on the device (nvJPEG)
    threads: int = 0  # torch CPU threads per process (0 = torch's default)
    eval_batch_videos: int = 16  # videos per forward pass when scoring the selection split

    def __post_init__(self) -> None:
        if self.lr_floor < 0 or self.lr_floor > self.lr:
            raise PipelineError(f"train_propy.lr_floor must lie in [0, lr = {self.lr}], got {self.lr_floor}")
        if not self.select_split:
            raise PipelineError(
                "train_propy.select_split must name a split (val, or test as the official code) or `last`"
            )
        if self.epochs < 1 or self.batch_videos < 1 or self.max_words < 3:
            raise PipelineError("train_propy: epochs and batch_videos must be >= 1 and max_words >= 3")


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


class CaptionCollate:
    """The official video-centric collate: stacked frames, all captions tokenised, each caption's video index."""

    def __init__(self, captions: Sequence[Sequence[str]], max_words: int) -> None:
        self.captions, self.max_words = captions, max_words

    def __call__(self, items: list[tuple[Frames, int]]) -> tuple[Frames, torch.Tensor, torch.Tensor]:
        frames = stack_frames([frames for frames, _ in items])
        texts = [self.captions[index] for _, index in items]
        labels = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([len(t) for t in texts]))
        return frames, tokenize([c for t in texts for c in t], self.max_words), labels


def _loader(dataset: FrameDataset, workers: int, pin: bool, **kwargs: Any) -> DataLoader:
    """A DataLoader over the frame cache (its reader holds no threads or handles across a fork)."""
    return DataLoader(dataset, num_workers=workers, pin_memory=pin, **kwargs)


class PropyObjective(nn.Module):
    """One training step's computation, the module DDP wraps: this rank's videos and captions encoded, every
    rank's embeddings gathered, the official loss of the global batch."""

    def __init__(self, model: ProPy) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, text_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLIP-normalised frames [B, Nf, 3, H, W], caption tokens [Nt, L], each caption's video [Nt] ->
        `loss`, `t2v_loss`, `v2t_loss` and the `logits` [global captions, global videos]."""
        videos = self.model.encode_videos(frames)
        queries = self.model.encode_queries(text_ids)
        videos, queries, labels = gather_embeddings(videos, queries, labels)
        logits = self.model.similarity(queries, videos)
        loss, t2v, v2t = propy_loss(logits, labels)
        return {"loss": loss, "t2v_loss": t2v, "v2t_loss": v2t, "logits": logits}


# ------------------------------------------------------------------------------------------------------------------
# Scoring a model (model selection and the evaluate stage)
# ------------------------------------------------------------------------------------------------------------------


def evaluate_propy(
    model: ProPy,
    base: BaseConfig,
    corpus: Corpus,
    protocol: EvalConfig,
    cfg: TrainPropyConfig,
    batch_videos: int,
    batch_queries: int,
    device: torch.device,
) -> dict[str, Any]:
    """Score `model` on one split with the evaluation package (the corpus is encoded once)."""
    was_training = model.training
    model.eval()
    nf = model.pyramid.num_frames
    dataset = FrameDataset(FrameCache(base.frames_path), corpus.video_ids, nf, train=False, tail_fix=cfg.tail_fix)
    videos = _loader(
        dataset, cfg.num_workers, device.type == "cuda", batch_size=batch_videos, collate_fn=collate_frames
    )
    texts = [q.query for q in corpus.queries]
    query_batches = [texts[i : i + batch_queries] for i in range(0, len(texts), batch_queries)]
    gt_video, gt_windows = ground_truth(corpus.queries, corpus.video_ids)
    durations_by_id = video_durations(corpus.queries)
    durations = torch.tensor([durations_by_id[v] for v in corpus.video_ids], dtype=torch.float64)
    scoring = dataclasses.replace(protocol.scoring, normalize_units=model.config.normalize_eval)
    protocol = dataclasses.replace(protocol, split=corpus.split, scoring=scoring)
    encoder = PropyEncoder(model, device, autocast_dtype(device, cfg.amp), cfg.max_words)
    try:
        metrics = evaluate_encoder(encoder, videos, query_batches, gt_video, protocol, durations, gt_windows, model)
        return {**metrics, **corpus.counts}
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------


def build_trainer(model: ProPy, cfg: TrainPropyConfig, steps_per_epoch: int, device: torch.device) -> Trainer:
    """The optimiser, schedule, clipping and loop of `train-propy` for `model` (verify-reference runs this too).

    With `decay_dead_parameters=False` the parameters that never get a gradient (`ProPy.dead_parameters`) are
    frozen: outside the optimiser their weights no longer decay; the model's outputs are the same either way.
    """
    if not cfg.decay_dead_parameters:
        for param in model.dead_parameters():
            param.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_adamw(model.named_parameters(), cfg.lr, cfg.weight_decay)
    schedule = WarmupCosine(cfg.lr, cfg.epochs * steps_per_epoch, cfg.warmup, cfg.lr_floor, cfg.warmup_whole_steps)
    loop = LoopConfig(cfg.epochs, steps_per_epoch, cfg.grad_clip, cfg.checkpoint_every_steps, cfg.max_steps)
    return Trainer(parameters, optimizer, schedule, device, cfg.amp, loop)


class PropyStep:
    """The loss of one `train-propy` batch: `PropyObjective` (in DDP under torchrun) plus the official loop's
    bookkeeping around it.

    Before every update but the first, `clip.logit_scale` is clamped in place to `LOGIT_SCALE_RANGE`, which is where
    the official loop clamps it after each update (a no-op for OpenAI's CLIP, whose value is ln 100). Dead
    parameters that train get a zero gradient, as officially (the fast path does not even run the last adapter), so
    AdamW steps and decays them (and DDP never sees them unused). `last` holds the logits and the two halves of the
    loss of the latest batch.
    """

    def __init__(self, model: ProPy, trainer: Trainer, device: torch.device) -> None:
        self.model, self.trainer, self.device = model, trainer, device
        self.objective = wrap_ddp(PropyObjective(model), device)
        self.dead = [p for p in model.dead_parameters() if p.requires_grad]
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, batch: tuple[Frames, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """A collated batch: uint8 frames [B, Nf, S, S, 3] (or JPEG bytes), token ids, caption labels."""
        frames, text_ids, labels = batch
        frames = frames.decode(self.device) if isinstance(frames, EncodedFrames) else frames.to(self.device)
        device = self.device
        return self.loss(normalize_frames(frames), text_ids.to(device), labels.to(device))

    def loss(self, frames: torch.Tensor, text_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """CLIP-normalised frames [B, Nf, 3, H, W], token ids [Nt, L], caption labels [Nt] -> (loss, videos)."""
        if self.trainer.progress.step > 0:
            with torch.no_grad():
                self.model.clip.logit_scale.clamp_(*LOGIT_SCALE_RANGE)
        for param in self.dead:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        outputs = self.objective(frames, text_ids, labels)
        self.last = {key: value.detach() for key, value in outputs.items()}
        return outputs["loss"], outputs["logits"].shape[1]


def history_path(base: BaseConfig) -> Path:
    """The per-epoch history (a DVC plot)."""
    return base.dataset_metrics / f"{MODEL_NAME}_history.tsv"


def run_train_propy(base: BaseConfig, cfg: TrainPropyConfig) -> Path:
    """Train ProPy (single process or one rank of torchrun/SLURM) and return the run directory.

    Resumes from `last.pt` when it was written with the same configuration; otherwise starts from scratch.
    """
    with distributed_run(cfg.device, cfg.threads) as (world, device):
        return _train(base, cfg, world, device)


def _train(base: BaseConfig, cfg: TrainPropyConfig, world: WorldInfo, device: torch.device) -> Path:
    log_stage = "train_propy" if is_main_process() else ""
    corpus = load_corpus(base, cfg.train_split, "train_propy.train_split", log_stage)
    select = cfg.select_split != "last"
    selection_corpus = None
    if select and is_main_process():
        selection_corpus = load_corpus(base, cfg.select_split, "train_propy.select_split", log_stage)
    clip_sha256 = file_sha256(base.clip_weights)
    model = build_propy(base, cfg.model, device)
    model.train()
    nf = model.pyramid.num_frames
    cache = FrameCache(base.frames_path)
    if cfg.decode_on_device and corpus.video_ids and cache.codec(corpus.video_ids[0]) != "jpeg":
        raise PipelineError(
            f"train_propy.decode_on_device needs a JPEG frame cache (decode.codec: jpeg); {cache.path} is not"
        )
    dataset = FrameDataset(
        cache, corpus.video_ids, nf, train=True, tail_fix=cfg.tail_fix, seed=base.seed, encoded=cfg.decode_on_device
    )
    if not cfg.decode_on_device:  # batches decoded into reused shared-memory slots
        dataset.share_batches(cfg.batch_videos, slots=2 * cfg.num_workers + 2)
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_videos, world, base.seed)
    collate = CaptionCollate(corpus.captions(), cfg.max_words)
    trainer = build_trainer(model, cfg, len(sampler), device)
    out = propy_dir(base)
    identity = {"seed": base.seed, "clip_sha256": clip_sha256}
    fingerprint = run_fingerprint(cfg, _RUNTIME_KEYS, "batch_videos", world, corpus.video_ids, **identity)
    checkpoint = RunCheckpoint(out / "last.pt", fingerprint, "train_propy")
    resumed = checkpoint.resume(trainer, lambda state: model.load_trainable_state_dict(state["trainable"]))
    if not resumed and is_main_process():
        (out / "best.pt").unlink(missing_ok=True)  # selected by another run
    if trainer.finished:
        log_main(f"train_propy: {out / 'last.pt'} is a finished run of this configuration; nothing to do")
        if is_main_process():
            _write_history(history_path(base), trainer.progress.history)
        return out

    def batches(epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        loader_options = {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda", "collate_fn": collate}
        for frames, text_ids, labels in epoch_loader(dataset, sampler, epoch, start, **loader_options):
            yield dataset.take(frames), text_ids, labels
            dataset.give_back(frames)  # the step is done with it

    def save() -> None:
        checkpoint.save(
            trainer,
            model=MODEL_NAME,
            model_config=cfg.model.to_dict(),
            clip_sha256=clip_sha256,
            trainable=model.trainable_state_dict(),
        )

    def end_epoch(record: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {"split": cfg.select_split}
        if is_main_process():
            if selection_corpus is not None:
                protocol = EvalConfig(bootstrap=NO_INTERVALS, moment_retrieval=False, measure_efficiency=False)
                scores = evaluate_propy(
                    model, base, selection_corpus, protocol, cfg, cfg.eval_batch_videos, 256, device
                )
                extra.update(select_R1=scores["R1"], select_SumR=scores["SumR"])
            best = max((r.get("select_SumR", -1.0) for r in trainer.progress.history), default=-1.0)
            if not select or extra["select_SumR"] > best:
                selection = {"split": cfg.select_split, "rule": _selection_rule(cfg.select_split)}
                selection.update(epoch=record["epoch"], **{k: v for k, v in extra.items() if k.startswith("select_")})
                _save_model(out / "best.pt", model, cfg.model, clip_sha256, selection)
            _write_history(history_path(base), [*trainer.progress.history, {**record, **extra}])
            score = f", {cfg.select_split} SumR {extra['select_SumR']:.2f}" if select else ""
            log_main(f"epoch {record['epoch']}: loss {record['loss']:.4f}{score}")
        barrier()
        return extra

    finished = trainer.fit(batches, PropyStep(model, trainer, device), save, end_epoch)
    if is_main_process():
        _write_history(history_path(base), trainer.progress.history)
        state = "finished" if finished else f"stopped at step {trainer.progress.step} (max_steps); run again to resume"
        log_main(f"train_propy: {state}; checkpoints in {out}")
    return out


def _selection_rule(split: str) -> str:
    if split == "last":
        return "last epoch (no selection)"
    return f"best epoch by SumR on the {split} split (ties: the earlier epoch)"


def _save_model(path: Path, model: ProPy, config: ProPyConfig, clip_sha256: str, selection: dict[str, Any]) -> None:
    payload = {
        "model": MODEL_NAME,
        "model_config": config.to_dict(),
        "clip_sha256": clip_sha256,
        "trainable": model.trainable_state_dict(),
        "selection": selection,
    }
    save_checkpoint(path, payload)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """The per-epoch records as TSV (epoch, step, loss, lr, split, select_R1, select_SumR), atomically."""
    columns = ["epoch", "step", "loss", "lr", "split", "select_R1", "select_SumR"]
    lines = ["\t".join(columns)]
    for record in history:
        lines.append("\t".join(_cell(record.get(c, "")) for c in columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------


def run_evaluate_propy(
    base: BaseConfig,
    cfg: TrainPropyConfig,
    eval_cfg: EvaluateConfig,
    checkpoint: str | Path | None = None,
    metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the trained ProPy (and, as a reference, the same model before training); write the metrics file
    (`metrics/<dataset>/propy.json` or `metrics_path`). `checkpoint` evaluates that model file instead, e.g. an
    official checkpoint converted by `import-checkpoint` (the frames must be decoded at its number of frames)."""
    device = resolve_device(cfg.device, WorldInfo())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    headline = eval_cfg.protocol.split
    corpus = load_corpus(base, headline, "evaluate.protocol.split", "evaluate propy")
    also = {split: load_corpus(base, split, "evaluate.also_splits", "evaluate propy") for split in eval_cfg.also_splits}
    model, selection = load_trained_propy(base, device, checkpoint)

    def score(model: ProPy, corpus: Corpus, protocol: EvalConfig) -> dict[str, Any]:
        return evaluate_propy(model, base, corpus, protocol, cfg, eval_cfg.batch_videos, eval_cfg.batch_queries, device)

    metrics = {"model": MODEL_NAME, **score(model, corpus, eval_cfg.protocol)}
    metrics["feature_source"] = f"{base.frames_path.name} (frames; CLIP {base.clip_arch} with prompts and adapters)"
    metrics["chance_R1"] = 100.0 / len(corpus.video_ids)
    selection["official"] = selection["split"] == headline
    if selection["official"]:
        selection["note"] = "official behaviour: the epoch was selected on the evaluated split itself (optimistic)"
    metrics["selection"] = selection
    quick = dataclasses.replace(eval_cfg.protocol, measure_efficiency=False)
    metrics["splits"] = {split: score(model, split_corpus, quick) for split, split_corpus in also.items()}
    if eval_cfg.untrained_reference:
        untrained = build_propy(base, model.config, device, clip=(model.clip, model.arch))
        metrics["untrained"] = score(untrained, corpus, quick)
    path = Path(metrics_path) if metrics_path else base.dataset_metrics / f"{MODEL_NAME}.json"
    write_metrics(path, metrics)
    log_main(f"evaluate propy: {headline} R1 {metrics['R1']:.2f} SumR {metrics['SumR']:.2f} -> {path}")
    return metrics
