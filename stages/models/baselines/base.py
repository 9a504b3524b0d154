"""What every feature-based baseline shares: the configuration core, the query encoder and the scoring interface.

Evaluation interface (the evaluate stage's `RetrievalEncoder` protocol):
    q = model.encode_queries(query_batch)      # [N_q, D]
    v = model.encode_videos(video_batch)       # [N_v, K, D]: the model's per-video cache packed in one tensor
    s = model.score(q, v)                      # [N_q, N_v] fused similarity clip_scale_w * S_c + frame_scale_w * S_f
`model.score_fn` is `model.score`, so evaluation uses the model's own similarity (not a max-over-units cosine).
Search: `model.moment_units(video_batch, num_frames)` says which packed rows are moments of the video and where.
Training: `model(train_batch, sampling) -> (losses with "total", chosen negatives)`; a model adds its losses to a
`TrainingStep` in `add_losses`, and the step keeps the family's bookkeeping (weighted terms, reported parts,
negatives under the keys of the injected ranks). Multi-GPU: a model encodes its batch, passes the per-video and
per-query encodings through `step.gather` (every rank's, in rank order, when training runs under DDP; the same
tensors in one process) and computes every batch-level term from what it returns, with `step.labels`. Its losses
then equal one process's on the whole global batch; terms computed before the gather stay per rank.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import torch
from torch import nn

from stages.models.baselines.data import QueryBatch, TrainBatch, VideoBatch
from stages.models.baselines.layers import AttentionBlock, InputProjection, PositionalEncoding, attention_pool
from stages.models.baselines.losses import NegativeSampling, multi_positive_nce, video_triplet
from stages.models.baselines.preprocessing import PreprocessConfig, clip_ranges

Encodings: TypeAlias = dict[str, torch.Tensor]
# (this rank's per-video tensors, per-query tensors, query labels) -> the same for the global batch
BatchGather: TypeAlias = Callable[[Encodings, Encodings, torch.Tensor], tuple[Encodings, Encodings, torch.Tensor]]


@dataclass(frozen=True)
class BaselineConfig:
    """Dimensions and settings common to the MS-SL family (names as in the official configs)."""

    visual_input_size: int = 512  # d_v: frame feature size (CLIP ViT-B/32 projected [CLS])
    query_input_size: int = 512  # d_t: token feature size
    hidden_size: int = 384  # D
    n_heads: int = 4
    max_ctx_l: int = 128  # frame positions (longer videos are resampled to this)
    max_desc_l: int = 30  # query positions (tokens kept); use >= 32 for CLIP tokens
    map_size: int = 32  # M: clips per video
    input_drop: float = 0.1  # dropout inside the input projections
    drop: float = 0.1  # every other dropout
    layer_norm_eps: float = 1e-5
    margin: float = 0.1  # triplet margin
    clip_scale_w: float = 0.7  # alpha_c of the fused score
    frame_scale_w: float = 0.3  # alpha_f of the fused score

    def preprocess(self) -> PreprocessConfig:
        """The input preprocessing that matches these dimensions."""
        return PreprocessConfig(map_size=self.map_size, max_ctx_l=self.max_ctx_l, max_desc_l=self.max_desc_l)


@dataclass
class MomentUnits:
    """The rows of a packed video tensor (`encode_videos`) that are moments of the video, and where they lie."""

    rows: torch.Tensor  # [U] int64 indices into the packed rows
    windows: torch.Tensor  # [B, U, 2] [start, end] as fractions of each video (0..1); NaN: not a unit of that video


def clip_windows(num_frames: Sequence[int], cfg: PreprocessConfig) -> torch.Tensor:
    """[B, M, 2] window of each clip-tensor row (the frames it averages) as fractions of each video."""
    return torch.stack([torch.from_numpy(clip_ranges(t, cfg) / t) for t in num_frames]).float()


class BaselineModel(nn.Module, abc.ABC):
    """Base class: subclasses create the shared inputs with `_add_input_modules` and implement the video side."""

    cfg: BaselineConfig

    def _add_input_modules(self, video_inputs: bool = True, query_encoder: nn.Module | None = None) -> None:
        """The modules every model of the family creates first, in the official order (state-dict keys and the
        initialisation follow it): `query_pos_embed`, [`clip_pos_embed`, `frame_pos_embed`], `query_input_proj`,
        `query_encoder` (an `AttentionBlock` unless given), [`clip_input_proj`]; the bracketed ones when
        `video_inputs`."""
        cfg = self.cfg
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.query_pos_embed = PositionalEncoding(cfg.max_desc_l, dim, cfg.drop, eps)
        if video_inputs:
            self.clip_pos_embed = PositionalEncoding(cfg.max_ctx_l, dim, cfg.drop, eps)
            self.frame_pos_embed = PositionalEncoding(cfg.max_ctx_l, dim, cfg.drop, eps)
        self.query_input_proj = InputProjection(cfg.query_input_size, dim, cfg.input_drop, eps)
        self.query_encoder = (
            AttentionBlock(dim, cfg.n_heads, cfg.drop, eps=eps) if query_encoder is None else query_encoder
        )
        if video_inputs:
            self.clip_input_proj = InputProjection(cfg.visual_input_size, dim, cfg.input_drop, eps)

    def preprocess_config(self) -> PreprocessConfig:
        """How raw features must be preprocessed for this model."""
        return self.cfg.preprocess()

    def moment_units(self, batch: VideoBatch, num_frames: Sequence[int]) -> MomentUnits:
        """The packed rows a moment can be, with their windows (`num_frames`: each video's raw feature rows).

        Default: the M clip-tensor rows, which the family packs first (GMMFormer's layout); a model whose packed
        tensor starts otherwise, or whose clips are not the clip tensor's bins, overrides this.
        """
        return MomentUnits(torch.arange(self.cfg.map_size), clip_windows(num_frames, self.preprocess_config()))

    def encode_queries(self, batch: QueryBatch) -> torch.Tensor:
        """[N_q, D] query vectors: projection, positions, one attention block, attention pooling."""
        hidden = self.query_pos_embed(self.query_input_proj(batch.query_feats))
        hidden = self.query_encoder(hidden, batch.query_mask)
        return attention_pool(hidden, batch.query_mask, self.modular_vector_mapping)

    @abc.abstractmethod
    def encode_videos(self, batch: VideoBatch) -> torch.Tensor:
        """[B, K, D] packed per-video cache of a block of videos."""
        raise NotImplementedError

    @abc.abstractmethod
    def score_branches(self, queries: torch.Tensor, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"clip": S_c, "frame": S_f, ...}, each [N_q, N_v], of queries [N_q, D] and packed videos [N_v, K, D]."""
        raise NotImplementedError

    def score(self, queries: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:
        """[N_q, N_v] fused similarity `clip_scale_w * S_c + frame_scale_w * S_f`."""
        branches = self.score_branches(queries, videos)
        return self.cfg.clip_scale_w * branches["clip"] + self.cfg.frame_scale_w * branches["frame"]

    @property
    def score_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The similarity the evaluator must use (`score`)."""
        return self.score

    def training_loss(
        self, batch: TrainBatch, sampling: NegativeSampling, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, every loss term) of one training batch."""
        losses, _ = self(batch, sampling, generator)
        return losses["total"], losses

    def forward(
        self,
        batch: TrainBatch,
        sampling: NegativeSampling,
        generator: torch.Generator | None = None,
        ranks: Mapping[str, torch.Tensor] | None = None,
        gather: BatchGather | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Training losses of one batch (`"total"` is the sum of the weighted terms) and the chosen negatives.

        Args:
            batch: videos with their queries (`batch.queries.labels` set).
            sampling: the negative-sampling setting of this epoch.
            generator: random source of the negative ranks.
            ranks: inject the ranks of the negatives per triplet term instead of drawing them (reference checks).
            gather: all-gathers the encodings of every rank (`stages.train.distributed.gather_batch` under DDP).
        """
        if batch.queries.labels is None:
            raise ValueError("training batches need query labels")
        step = TrainingStep(batch, sampling, generator, dict(ranks or {}), self.cfg.margin, gather)
        self.add_losses(step)
        return step.result()

    @abc.abstractmethod
    def add_losses(self, step: TrainingStep) -> None:
        """Add this model's training losses of `step.batch` to `step` (see the model's docstring for the keys)."""
        raise NotImplementedError


@dataclass
class TrainingStep:
    """One training batch and the losses a model adds for it: what `BaselineModel.forward` returns."""

    batch: TrainBatch
    sampling: NegativeSampling
    generator: torch.Generator | None
    ranks: dict[str, torch.Tensor]  # injected negative ranks, keyed `<branch>_<term>`
    margin: float  # triplet margin
    gather_fn: BatchGather | None = None  # all-gathers encodings over ranks (None: one process)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted terms, summed into "total" in order
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # reported parts of terms (not summed again)
    negatives: dict[str, torch.Tensor] = field(default_factory=dict)  # chosen negatives, keyed like `ranks`
    gathered_labels: torch.Tensor | None = None  # the global batch's labels, once `gather` ran

    @property
    def labels(self) -> torch.Tensor:
        """[B_q] the batch index of each query's video (in the global batch once `gather` ran)."""
        return self.batch.queries.labels if self.gathered_labels is None else self.gathered_labels

    def gather(
        self, videos: Mapping[str, torch.Tensor], queries: Mapping[str, torch.Tensor]
    ) -> tuple[Encodings, Encodings]:
        """The global batch's per-video [B, ...] and per-query [N_q, ...] encodings: every rank's, in rank order,
        with gradients; `labels` then index the global batch's videos. In one process: the same tensors."""
        if self.gather_fn is None:
            return dict(videos), dict(queries)
        videos, queries, self.gathered_labels = self.gather_fn(dict(videos), dict(queries), self.batch.queries.labels)
        return videos, queries

    def branch_ranks(self, branch: str) -> dict[str, torch.Tensor]:
        """The injected ranks of one branch's triplet terms, keyed by term."""
        return with_prefix(self.ranks, f"{branch}_")

    def add_triplet(
        self, branch: str, terms: Mapping[str, torch.Tensor], negatives: Mapping[str, torch.Tensor], weight: float
    ) -> None:
        """`<branch>_trip` = weight x the sum of the triplet's terms (also reported one by one), and its negatives."""
        self.losses[f"{branch}_trip"] = weight * sum(terms.values())
        self.parts |= {f"{branch}_trip_{k}": v for k, v in terms.items()}
        self.negatives |= {f"{branch}_{k}": v for k, v in negatives.items()}

    def add_ranking(
        self, branch: str, cosine: torch.Tensor, raw: torch.Tensor, nce_weight: float, trip_weight: float = 1.0
    ) -> None:
        """The family's pair of losses for one branch: multi-positive NCE on raw scores, video triplet on cosines."""
        self.losses[f"{branch}_nce"] = nce_weight * multi_positive_nce(raw, self.labels)
        terms, negatives = video_triplet(
            cosine, self.labels, self.margin, self.sampling, self.generator, self.branch_ranks(branch)
        )
        self.add_triplet(branch, terms, negatives, trip_weight)

    def result(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the weighted terms, `total` and the reported parts; the negatives)."""
        return {**self.losses, "total": sum(self.losses.values()), **self.parts}, self.negatives


def with_prefix(mapping: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `mapping` whose key starts with `prefix`, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in mapping.items() if k.startswith(prefix)}
