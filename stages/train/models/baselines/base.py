"""What every feature-based baseline shares: the configuration core, the query encoder and the scoring interface.

Evaluation interface (the evaluate stage's `RetrievalEncoder` protocol):
    q = model.encode_queries(query_batch)      # [N_q, D]
    v = model.encode_videos(video_batch)       # [N_v, K, D]: the model's per-video cache packed in one tensor
    s = model.score(q, v)                      # [N_q, N_v] fused similarity clip_scale_w * S_c + frame_scale_w * S_f
`model.score_fn` is `model.score`, so evaluation uses the model's own similarity (not a max-over-units cosine).
Training: `model(train_batch, sampling) -> (losses with "total", chosen negatives)`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from stages.train.models.baselines.data import QueryBatch, TrainBatch, VideoBatch
from stages.train.models.baselines.layers import AttentionBlock, InputProjection, PositionalEncoding, attention_pool
from stages.train.models.baselines.losses import NegativeSampling
from stages.train.models.baselines.preprocessing import PreprocessConfig


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


class BaselineModel(nn.Module, abc.ABC):
    """Base class: subclasses create the query modules with `_query_modules` and implement the video side."""

    cfg: BaselineConfig

    def _query_modules(self) -> tuple[PositionalEncoding, InputProjection, AttentionBlock]:
        """The query pathway: positional encoding, input projection, attention block (official names set by caller)."""
        cfg = self.cfg
        return (
            PositionalEncoding(cfg.max_desc_l, cfg.hidden_size, cfg.drop, cfg.layer_norm_eps),
            InputProjection(cfg.query_input_size, cfg.hidden_size, cfg.input_drop, cfg.layer_norm_eps),
            AttentionBlock(cfg.hidden_size, cfg.n_heads, cfg.drop, eps=cfg.layer_norm_eps),
        )

    def preprocess_config(self) -> PreprocessConfig:
        """How raw features must be preprocessed for this model."""
        return self.cfg.preprocess()

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
        """(total loss, every loss term) of one training batch: what `train_baseline` calls."""
        losses, _ = self(batch, sampling, generator)
        return losses["total"], losses

    @abc.abstractmethod
    def forward(
        self,
        batch: TrainBatch,
        sampling: NegativeSampling,
        generator: torch.Generator | None = None,
        ranks: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Training losses of one batch (`"total"` is the sum) and the chosen triplet negatives.

        Args:
            batch: videos with their queries (`batch.queries.labels` set).
            sampling: the negative-sampling setting of this epoch.
            generator: random source of the negative ranks.
            ranks: inject the ranks of the negatives per triplet term instead of drawing them (reference checks).
        """
        raise NotImplementedError


def with_prefix(mapping: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `mapping` whose key starts with `prefix`, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in mapping.items() if k.startswith(prefix)}
