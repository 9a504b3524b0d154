"""MS-SL (ACM MM'22, HuiGuanLab/ms-sl @ e014c31), faithful to the official code; state dicts load unchanged.

- Query: projection -> positions -> attention block (masked) -> attention pooling -> q.
- Clip branch: clip tensor [M, d_v] -> projection -> positions -> attention block (no mask) -> E_c, then every
  contiguous span of the M clips mean-pooled: M(M+1)/2 proposals, window length k major, start s minor.
- Frame branch: frames -> projection -> positions -> attention block (masked) -> E_f; keys/values W_k E_f, W_v E_f.
- S_c(q, v) = max_p cos(q, P[v, p]) with key clip p*; the key-clip-guided attention
  f_{q,v} = sum_t softmax_t(K_t . P[v, p*]) V_t (no scaling, padded frames masked) gives S_f(q, v) = cos(q, f_{q,v}).
- Training: S~_c = max_p q . P (its own max), f only on each query's own video, S_f[i, j] = cos(q_i, f_j) (B_q x B_q);
  loss = clip_nce_weight * NCE(S~_c) + Trip(S_c) + frame_nce_weight * diagonal NCE(S~_f) + diagonal Trip(S_f).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.models.baselines.base import BaselineConfig, BaselineModel, MomentUnits, TrainingStep
from stages.models.baselines.data import TrainBatch, VideoBatch
from stages.models.baselines.layers import AttentionBlock, InputProjection, init_weights
from stages.models.baselines.losses import (
    diagonal_nce,
    diagonal_triplet,
)
from stages.models.registry import register_model

FRAME_ATTENTION_MASK_FILL = -1e9
NAN = float("nan")


@dataclass(frozen=True)
class MSSLConfig(BaselineConfig):
    """MS-SL settings (defaults: the official TVR configuration, with CLIP ViT-B/32 input sizes)."""

    clip_nce_weight: float = 0.02  # weight of the multi-positive NCE on raw clip scores
    frame_nce_weight: float = 0.04  # weight of the diagonal NCE on raw frame scores
    clip_trip_weight: float = 1.0  # weight of the clip triplet
    frame_trip_weight: float = 1.0  # weight of the frame triplet
    score_chunk: int = 64  # queries scored at once (bounds the memory of the query-dependent frame attention)


@dataclass
class MSSLVideos:
    """Encoded videos: what MS-SL caches per video."""

    proposals: torch.Tensor  # [B, M(M+1)/2, D] multi-scale clip proposals
    frame_keys: torch.Tensor  # [B, L_f, D] W_k E_f
    frame_values: torch.Tensor  # [B, L_f, D] W_v E_f
    frame_mask: torch.Tensor  # [B, L_f]

    def pack(self, max_frames: int) -> torch.Tensor:
        """One [B, P + 2 max_frames, D] tensor: proposals, keys (NaN at padded frames), values (0 there)."""
        pad = max_frames - self.frame_keys.shape[1]
        keys = F.pad(self.frame_keys, (0, 0, 0, pad)).masked_fill(F.pad(self.frame_mask, (0, pad))[..., None] == 0, NAN)
        return torch.cat([self.proposals, keys, F.pad(self.frame_values, (0, 0, 0, pad))], dim=1)

    @classmethod
    def unpack(cls, packed: torch.Tensor, max_frames: int) -> MSSLVideos:
        """Inverse of `pack`."""
        num_proposals = packed.shape[1] - 2 * max_frames
        proposals, keys, values = packed.split([num_proposals, max_frames, max_frames], dim=1)
        mask = (~torch.isnan(keys[..., 0])).to(packed.dtype)
        return cls(proposals, keys.nan_to_num(0.0), values, mask)


def multi_scale_proposals(clips: torch.Tensor) -> torch.Tensor:
    """[B, M, D] -> [B, M(M+1)/2, D]: mean of every contiguous span, ordered by length first, then start."""
    length = clips.shape[1]
    spans = [F.avg_pool1d(clips.transpose(1, 2), k, stride=1).transpose(1, 2) for k in range(1, length + 1)]
    return torch.cat(spans, dim=1)


def multi_scale_windows(windows: torch.Tensor) -> torch.Tensor:
    """[B, M, 2] clip windows -> [B, M(M+1)/2, 2] windows of the spans, in `multi_scale_proposals` order."""
    length = windows.shape[1]
    spans = [
        torch.stack([windows[:, : length - k + 1, 0], windows[:, k - 1 :, 1]], dim=-1) for k in range(1, length + 1)
    ]
    return torch.cat(spans, dim=1)


def _attend(logits: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, equation: str) -> torch.Tensor:
    weights = torch.softmax(logits.masked_fill(mask == 0, FRAME_ATTENTION_MASK_FILL), dim=-1)
    return torch.einsum(equation, weights, values)


@register_model("msl", config=MSSLConfig)
class MSSL(BaselineModel):
    """Multi-scale similarity learning (parameter names and order as in the official `MS_SL` module)."""

    def __init__(self, cfg: MSSLConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MSSLConfig()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self._add_input_modules()
        self.clip_encoder = AttentionBlock(dim, cfg.n_heads, cfg.drop, eps=eps)
        self.frame_input_proj = InputProjection(cfg.visual_input_size, dim, cfg.input_drop, eps)
        self.frame_encoder = AttentionBlock(dim, cfg.n_heads, cfg.drop, eps=eps)
        self.modular_vector_mapping = nn.Linear(dim, 1, bias=False)
        self.mapping_linear = nn.ModuleList([nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)])
        self.apply(init_weights)

    def encode_clips(self, clip_feats: torch.Tensor) -> torch.Tensor:
        """[B, M, d_v] clip tensors -> [B, M, D] encoded clips E_c."""
        return self.clip_encoder(self.clip_pos_embed(self.clip_input_proj(clip_feats)))

    def encode_frames(self, frame_feats: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """[B, L_f, d_v] padded frames -> [B, L_f, D] encoded frames E_f."""
        return self.frame_encoder(self.frame_pos_embed(self.frame_input_proj(frame_feats)), frame_mask)

    def encode_video_parts(self, batch: VideoBatch) -> MSSLVideos:
        """Proposals and frame keys/values of a block of videos."""
        frames = self.encode_frames(batch.frame_feats, batch.frame_mask)
        return MSSLVideos(
            proposals=multi_scale_proposals(self.encode_clips(batch.clip_feats)),
            frame_keys=self.mapping_linear[0](frames),
            frame_values=self.mapping_linear[1](frames),
            frame_mask=batch.frame_mask,
        )

    def encode_videos(self, batch: VideoBatch) -> torch.Tensor:
        """[B, M(M+1)/2 + 2 max_ctx_l, D]: proposals, frame keys (NaN where padded) and values (`MSSLVideos.pack`)."""
        return self.encode_video_parts(batch).pack(self.cfg.max_ctx_l)

    def moment_units(self, batch: VideoBatch, num_frames: Sequence[int]) -> MomentUnits:
        """The M(M+1)/2 multi-scale proposals, packed first; each spans consecutive clips."""
        clips = super().moment_units(batch, num_frames)
        return MomentUnits(
            torch.arange(clips.windows.shape[1] * (clips.windows.shape[1] + 1) // 2), multi_scale_windows(clips.windows)
        )

    def clip_scores(self, queries: torch.Tensor, videos: MSSLVideos) -> tuple[torch.Tensor, torch.Tensor]:
        """S_c [N_q, N_v] (max cosine over proposals) and the key-clip index [N_q, N_v]."""
        cosine = torch.einsum("qd,vpd->qvp", F.normalize(queries, dim=-1), F.normalize(videos.proposals, dim=-1))
        return cosine.max(dim=-1)

    def frame_features(self, key_clips: torch.Tensor, videos: MSSLVideos) -> torch.Tensor:
        """f_{q,v} [N_q, N_v, D]: key-clip-guided attention over each video's frames (key_clips [N_q, N_v])."""
        columns = torch.arange(key_clips.shape[1], device=key_clips.device)
        guides = videos.proposals[columns, key_clips]  # [N_q, N_v, D]
        logits = torch.einsum("qvd,vld->qvl", guides, videos.frame_keys)
        return _attend(logits, videos.frame_mask[None], videos.frame_values, "qvl,vld->qvd")

    def score_branches(self, queries: torch.Tensor, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"clip": S_c, "frame": S_f, "key_clip": p*}, each [N_q, N_v], of packed videos; queries in chunks."""
        videos = MSSLVideos.unpack(videos, self.cfg.max_ctx_l)
        parts: dict[str, list[torch.Tensor]] = {"clip": [], "frame": [], "key_clip": []}
        for chunk in queries.split(self.cfg.score_chunk):
            clip, key_clip = self.clip_scores(chunk, videos)
            attended = F.normalize(self.frame_features(key_clip, videos), dim=-1)
            frame = torch.einsum("qd,qvd->qv", F.normalize(chunk, dim=-1), attended)
            for name, value in (("clip", clip), ("frame", frame), ("key_clip", key_clip)):
                parts[name].append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    def training_scores(self, batch: TrainBatch, step: TrainingStep | None = None) -> dict[str, torch.Tensor]:
        """The training matrices: clip [B_q, B_v] cosine and raw, frame [B_q, B_q] cosine and raw, and more; of the
        global batch when `step` gathers the encodings over ranks."""
        queries = self.encode_queries(batch.queries)
        videos = self.encode_video_parts(batch.videos)
        labels = batch.queries.labels
        if step is not None:
            encoded, gathered = step.gather(vars(videos), {"queries": queries})
            videos, queries, labels = MSSLVideos(**encoded), gathered["queries"], step.labels
        clip, key_clips = self.clip_scores(queries, videos)
        clip_raw = torch.einsum("qd,vpd->qvp", queries, videos.proposals).max(dim=-1).values
        own_key_clip = key_clips.gather(1, labels[:, None]).squeeze(1)
        guides = videos.proposals[labels, own_key_clip]  # [B_q, D]
        logits = torch.einsum("qd,qld->ql", guides, videos.frame_keys[labels])
        frame_feat = _attend(logits, videos.frame_mask[labels], videos.frame_values[labels], "ql,qld->qd")
        return {
            "query_vec": queries,
            "clip": clip,
            "clip_raw": clip_raw,
            "key_clip": own_key_clip,
            "frame_feat": frame_feat,
            "frame": F.normalize(queries, dim=-1) @ F.normalize(frame_feat, dim=-1).t(),
            "frame_raw": queries @ frame_feat.t(),
        }

    def add_losses(self, step: TrainingStep) -> None:
        """Losses `clip_nce`, `clip_trip` (`_t2v`, `_v2t`), `frame_nce`, `frame_trip` (`_row`, `_col`).

        `ranks` keys: `clip_t2v`, `clip_v2t`, `frame_row`, `frame_col`; negatives are returned under the same keys.
        """
        cfg = self.cfg
        scores = self.training_scores(step.batch, step)
        step.add_ranking("clip", scores["clip"], scores["clip_raw"], cfg.clip_nce_weight, cfg.clip_trip_weight)
        step.losses["frame_nce"] = cfg.frame_nce_weight * diagonal_nce(scores["frame_raw"])
        terms, negatives = diagonal_triplet(
            scores["frame"], cfg.margin, step.sampling, step.generator, step.branch_ranks("frame")
        )
        step.add_triplet("frame", terms, negatives, cfg.frame_trip_weight)
