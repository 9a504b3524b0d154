"""GMMFormer (AAAI'24, huangmozhi9527/GMMFormer @ c38df37), faithful to the official code; state dicts load unchanged.

- Query: as MS-SL (projection -> positions -> attention block -> pooling).
- Clip branch: clip tensor -> projection -> positions -> GMM block -> GMM block (no mask) -> E_c [B, M, D].
- Frame branch: frames -> projection -> positions -> GMM block -> GMM block (masked) -> attention pooling with its own
  vector -> one vector per video. The Gaussian masks use the padded length of the batch, so a video's frame vector
  depends on which videos share its block (official behaviour).
- S_c(q, v) = max_t cos(q, E_c[v, t]); S_f(q, v) = cos(q, f_v); raw dot versions for the NCE terms.
- Loss: w1 NCE(S~_c) + Trip(S_c) + w2 NCE(S~_f) + Trip(S_f) + w3 QDL, with QDL on a second query-encoder pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.models.baselines.base import BaselineConfig, BaselineModel, TrainingStep
from stages.models.baselines.data import TrainBatch, VideoBatch
from stages.models.baselines.layers import (
    GMMBlock,
    InputProjection,
    attention_pool,
    init_weights,
)
from stages.models.baselines.losses import query_diverse_loss
from stages.models.registry import register_model


@dataclass(frozen=True)
class GMMFormerConfig(BaselineConfig):
    """GMMFormer settings (defaults: the official TVR configuration, with CLIP ViT-B/32 input sizes)."""

    input_drop: float = 0.2
    drop: float = 0.2
    gmm_block_widths: tuple[float | None, ...] = (None, 0.5, 1.0, 5.0)  # Gaussian width per branch (None: plain)
    loss_factor: tuple[float, float, float] = (0.05, 0.04, 0.001)  # weights of clip NCE, frame NCE, QDL
    neg_factor: tuple[float, float] = (0.15, 32.0)  # QDL margin and scale


@dataclass
class GMMFormerVideos:
    """Encoded videos: what GMMFormer caches per video."""

    clips: torch.Tensor  # [B, M, D] encoded clips
    frame_vec: torch.Tensor  # [B, D] pooled frame vector

    def pack(self) -> torch.Tensor:
        """One [B, M + 1, D] tensor: the clips, then the frame vector."""
        return torch.cat([self.clips, self.frame_vec[:, None]], dim=1)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> GMMFormerVideos:
        """Inverse of `pack`."""
        return cls(packed[:, :-1], packed[:, -1])


@register_model("gmmformer", config=GMMFormerConfig)
class GMMFormer(BaselineModel):
    """Gaussian-mixture-model transformer (parameter names and order as in the official module)."""

    def __init__(self, cfg: GMMFormerConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GMMFormerConfig()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps

        def gmm_block() -> GMMBlock:
            return GMMBlock(dim, cfg.n_heads, cfg.drop, cfg.gmm_block_widths, eps)

        self._add_input_modules()
        self.clip_encoder = gmm_block()
        self.clip_encoder_2 = gmm_block()
        self.frame_input_proj = InputProjection(cfg.visual_input_size, dim, cfg.input_drop, eps)
        self.frame_encoder_1 = gmm_block()
        self.frame_encoder_2 = gmm_block()
        self.modular_vector_mapping = nn.Linear(dim, 1, bias=False)
        self.modular_vector_mapping_2 = nn.Linear(dim, 1, bias=False)
        self.apply(init_weights)

    def encode_clips(self, clip_feats: torch.Tensor) -> torch.Tensor:
        """[B, M, d_v] clip tensors -> [B, M, D] encoded clips E_c."""
        hidden = self.clip_pos_embed(self.clip_input_proj(clip_feats))
        return self.clip_encoder_2(self.clip_encoder(hidden))

    def encode_frames(self, frame_feats: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """[B, L_f, d_v] padded frames -> [B, L_f, D] encoded frames."""
        hidden = self.frame_pos_embed(self.frame_input_proj(frame_feats))
        return self.frame_encoder_2(self.frame_encoder_1(hidden, frame_mask), frame_mask)

    def encode_video_parts(self, batch: VideoBatch) -> GMMFormerVideos:
        """Encoded clips and the pooled frame vector of a block of videos."""
        frames = self.encode_frames(batch.frame_feats, batch.frame_mask)
        return GMMFormerVideos(
            clips=self.encode_clips(batch.clip_feats),
            frame_vec=attention_pool(frames, batch.frame_mask, self.modular_vector_mapping_2),
        )

    def encode_videos(self, batch: VideoBatch) -> torch.Tensor:
        """[B, M + 1, D]: the encoded clips, then the pooled frame vector (`GMMFormerVideos.pack`)."""
        return self.encode_video_parts(batch).pack()

    def score_branches(self, queries: torch.Tensor, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"clip": S_c, "frame": S_f, "key_clip": argmax clip}, each [N_q, N_v], of packed videos."""
        parts = GMMFormerVideos.unpack(videos)
        unit = F.normalize(queries, dim=-1)
        clip, key_clip = torch.einsum("qd,vtd->qvt", unit, F.normalize(parts.clips, dim=-1)).max(dim=-1)
        frame = unit @ F.normalize(parts.frame_vec, dim=-1).t()
        return {"clip": clip, "frame": frame, "key_clip": key_clip}

    def training_scores(self, batch: TrainBatch, step: TrainingStep | None = None) -> dict[str, torch.Tensor]:
        """The [B_q, B_v] training matrices (cosine and raw dot, clip and frame) and the query vectors. With `step`
        (training) also `qdl_query_vec`, a second query-encoder pass (own dropout mask, as officially), and all of
        them for the global batch (`step.gather`)."""
        queries = self.encode_queries(batch.queries)
        videos = self.encode_video_parts(batch.videos)
        extra = {}
        if step is not None:
            second_pass = self.encode_queries(batch.queries)
            encoded, gathered = step.gather(vars(videos), {"queries": queries, "qdl": second_pass})
            videos, queries = GMMFormerVideos(**encoded), gathered["queries"]
            extra["qdl_query_vec"] = gathered["qdl"]
        branches = self.score_branches(queries, videos.pack())
        return {
            **extra,
            "query_vec": queries,
            "clip": branches["clip"],
            "clip_raw": torch.einsum("qd,vtd->qvt", queries, videos.clips).max(dim=-1).values,
            "frame": branches["frame"],
            "frame_raw": queries @ videos.frame_vec.t(),
        }

    def add_losses(self, step: TrainingStep) -> None:
        """Losses `clip_nce`, `clip_trip`, `frame_nce`, `frame_trip` (each trip with `_t2v`, `_v2t`), `qdl`.

        `ranks` keys: `clip_t2v`, `clip_v2t`, `frame_t2v`, `frame_v2t`; negatives are returned under the same keys.
        """
        cfg = self.cfg
        scores = self.training_scores(step.batch, step)
        for branch, nce_weight in (("clip", cfg.loss_factor[0]), ("frame", cfg.loss_factor[1])):
            step.add_ranking(branch, scores[branch], scores[f"{branch}_raw"], nce_weight)
        qdl = query_diverse_loss(scores["qdl_query_vec"], step.labels, *cfg.neg_factor)
        step.losses["qdl"] = cfg.loss_factor[2] * qdl
