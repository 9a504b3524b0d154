"""AMDNet (TMM'25, songpipi/AMDNet @ fd8b0b3), faithful to the official code; state dicts load unchanged.

Inputs (no L2 normalisation anywhere): the M clip means of the raw frame features, averaged in float32, and one
sentence vector per query (the last stored token row: CLIP's EOT embedding; `PreprocessConfig.sentence_query`).
- Query: q = ReLU(Linear(LN(s))), the input projection alone: no encoder, no positions, q >= 0.
- Video: x = PosEnc(InputProj(C)) [B, M, D]; g = Linear(LN(mean_t x)) (no activation); K span anchors
  (c_k, w_k) = sigmoid of the *interleaved* pairs of Linear(g) (2K logits); span masks
  G_k[t] = gaussian(t / (M - 1); c_k, max(w_k, 0.01) / 9), max-normalised (`layers.gaussian_window`); moments
  m_k = sum_t G_k[t] x_t (on x, not divided by sum_t G_k). Encoder: o0 = Attn(x); o1 = Attn(o0) with the scaled
  logits of head h multiplied by span mask h (so K = n_heads, or K = 1 for one mask on every head);
  E = (o0 + o1) / 2 [B, M, D], the only thing stored per video.
- Score: S(q, v) = max_t cos(q, E[v, t]). The official evaluation uses this clip score alone: the configuration's
  fusion weights (clip_scale_w 0.9 / frame_scale_w 0.1) are read by nothing, and there is no frame branch.
- Loss: loss_factor[0] NCE(max_t q . E) + loss_factor[1] mean_v ||div_lambda I - G^ G^T||_F^2 (G^: each span
  divided by its sum) + rel_weight mean_i relu(rel_margin + cos(q'_i, g_{y_i}) - max_k cos(q'_i, m_{y_i, k})),
  with q' a second query pass (its own dropout mask). No triplet and no negative sampling: the margin, hard-negative
  switch and pool size of the official configs are read by nothing, and `forward` returns no negatives.
- Official TVR training: D 384, lr 3e-4, 200 epochs, early stop after 15, batch 128, seed 9527, loss_factor
  (0.04, 1). ActivityNet / Charades: D 256, lr 2.5e-4, loss_factor (0.02, 1), 100 epochs (patience 15 / 10),
  seed 3407, Charades dropout 0.15. BertAdam decays `clip2video.layernorm.weight` (its name is not `LayerNorm`),
  as the official name rule does.

The released code does not run. This port follows the fixture, which was made after these patches (none changes the
live path): the nonexistent `NeXtVLAD` import dropped; a dead call to an undefined `generate_gauss_weight` in the
encoder block deleted; the validation unpacking 4 values, not 6; CPU instead of hard-coded `.cuda()`. The release
also crashes on a batch of one video (a `.squeeze()` of the encoder output); this port does not.

Official defect, reproduced by default, with its fix:
- `stable_span_masks`: a span so narrow that every grid point underflows in float32 (e.g. M = 16, w = 0.02,
  c = 0.5) gives 0 / 0 = NaN mask rows, which make the loss NaN (the official training then stops). True rescales
  in the log domain: the same masks wherever the official ones are finite, and never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.models.baselines.base import BaselineConfig, BaselineModel, TrainingStep
from stages.models.baselines.data import QueryBatch, TrainBatch, VideoBatch
from stages.models.baselines.layers import (
    AttentionBlock,
    InputProjection,
    PositionalEncoding,
    gaussian_window,
    init_weights,
)
from stages.models.baselines.losses import multi_positive_nce
from stages.models.baselines.preprocessing import PreprocessConfig
from stages.models.registry import register_model


@dataclass(frozen=True)
class AMDNetConfig(BaselineConfig):
    """AMDNet settings (defaults: the official TVR configuration, CLIP ViT-B/32 inputs).

    Inherited and unused, as officially: `max_desc_l` (one sentence vector per query), `margin`, `clip_scale_w`,
    `frame_scale_w`; `max_ctx_l` sizes the clip position table (only its first `map_size` rows are used).
    """

    input_drop: float = 0.2
    drop: float = 0.2
    event_size: int = 4  # K span anchors: n_heads (head h is masked by span h) or 1 (one mask for every head)
    loss_factor: tuple[float, float] = (0.04, 1.0)  # weights of the clip NCE and of the span-diversity loss
    div_lambda: float = 0.15  # diagonal of the diversity target div_lambda * I
    rel_margin: float = 0.02  # margin of the moment-relevance hinge
    rel_weight: float = 25.0  # weight of the moment-relevance loss
    stable_span_masks: bool = False  # fix: log-domain mask normalisation (official: NaN rows for very narrow spans)

    def __post_init__(self) -> None:
        if self.event_size not in (1, self.n_heads):
            raise ValueError(f"event_size must be 1 or n_heads ({self.n_heads}), got {self.event_size}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")

    def preprocess(self) -> PreprocessConfig:
        """Official AMDNet inputs: float32 clip means, no normalisation, one sentence vector per query."""
        return PreprocessConfig(
            map_size=self.map_size,
            max_ctx_l=self.max_ctx_l,
            max_desc_l=self.max_desc_l,
            normalize=False,
            resample_precision="float32",
            sentence_query=True,
        )


@dataclass
class AMDNetVideos:
    """A block of encoded videos with the span internals the training losses use."""

    clips: torch.Tensor  # [B, M, D] encoded clips E (what is stored per video)
    global_vec: torch.Tensor  # [B, D] g
    centres: torch.Tensor  # [B, K] span centres c_k
    widths: torch.Tensor  # [B, K] span widths w_k
    masks: torch.Tensor  # [B, K, M] span masks G
    moments: torch.Tensor  # [B, K, D] moment features m_k


class VideoGlobal(nn.Module):
    """g = Linear(LN(mean_t x)) (the official `clip2video`: `layernorm`, `fc_out1`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.fc_out1 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, M, D] -> [B, D]."""
        return self.fc_out1(self.layernorm(x.mean(dim=1)))


class SpanAnchoredEncoder(nn.Module):
    """The clip encoder: a plain attention block, then one whose heads are masked by learned Gaussian spans."""

    def __init__(self, cfg: AMDNetConfig) -> None:
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.event_size = cfg.event_size
        self.stable_masks = cfg.stable_span_masks
        self.attn0 = AttentionBlock(dim, cfg.n_heads, cfg.drop, eps=eps)
        self.attn1 = AttentionBlock(dim, cfg.n_heads, cfg.drop, eps=eps)
        self.clip2video = VideoGlobal(dim, eps)
        self.fc_gauss = nn.Linear(dim, 2 * cfg.event_size)

    def forward(self, x: torch.Tensor) -> AMDNetVideos:
        """x [B, M, D] (the positional-encoding output) -> encoded clips and span internals."""
        global_vec = self.clip2video(x)
        pairs = torch.sigmoid(self.fc_gauss(global_vec)).unflatten(-1, (self.event_size, 2))  # interleaved (c, w)
        centres, widths = pairs[..., 0], pairs[..., 1]
        grid = torch.linspace(0, 1, x.shape[1], dtype=x.dtype, device=x.device)
        masks = gaussian_window(grid, centres[..., None], widths[..., None], self.stable_masks)  # [B, K, M]
        first = self.attn0(x)
        second = self.attn1(first, logit_weights=masks[:, :, None, :])  # head h: scaled logits x span mask h
        return AMDNetVideos((first + second) / 2, global_vec, centres, widths, masks, masks @ x)


def span_diversity(masks: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gram [B, K, K] of the sum-normalised spans, per-video loss ||target I - Gram||_F^2 [B]) of masks [B, K, M]."""
    spans = masks / masks.sum(dim=-1, keepdim=True)
    gram = spans @ spans.transpose(1, 2)
    eye = torch.eye(masks.shape[1], dtype=masks.dtype, device=masks.device)
    return gram, (target * eye - gram).pow(2).sum(dim=(1, 2))


@register_model("amdnet", config=AMDNetConfig)
class AMDNet(BaselineModel):
    """Adaptive moment-discovery network (parameter names and order as in the official `GMMFormer_Net` module)."""

    def __init__(self, cfg: AMDNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AMDNetConfig()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.clip_pos_embed = PositionalEncoding(cfg.max_ctx_l, dim, cfg.input_drop, eps)
        self.query_input_proj = InputProjection(cfg.query_input_size, dim, cfg.input_drop, eps)
        self.clip_input_proj = InputProjection(cfg.visual_input_size, dim, cfg.input_drop, eps)
        self.clip_encoder = SpanAnchoredEncoder(cfg)
        self.apply(init_weights)

    def encode_queries(self, batch: QueryBatch) -> torch.Tensor:
        """[N_q, D] q = ReLU(Linear(LN(s))) of each query's sentence vector s (its last token row)."""
        return self.query_input_proj(batch.last_tokens())

    def encode_video_parts(self, batch: VideoBatch) -> AMDNetVideos:
        """Encoded clips and span internals of a block of videos (the frame sequences are not used)."""
        return self.clip_encoder(self.clip_pos_embed(self.clip_input_proj(batch.clip_feats)))

    def encode_videos(self, batch: VideoBatch) -> torch.Tensor:
        """[B, M, D] encoded clips E."""
        return self.encode_video_parts(batch).clips

    @staticmethod
    def clip_level_scores(queries: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:
        """[N_q, N_v, M] cos(q, E[v, t]) of queries [N_q, D] and encoded clips [N_v, M, D]."""
        return torch.einsum("qd,vtd->qvt", F.normalize(queries, dim=-1), F.normalize(videos, dim=-1))

    def score_branches(self, queries: torch.Tensor, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"clip": max_t cos(q, E[v, t]), "key_clip": its arg-max}, each [N_q, N_v]."""
        clip, key_clip = self.clip_level_scores(queries, videos).max(dim=-1)
        return {"clip": clip, "key_clip": key_clip}

    def score(self, queries: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:
        """[N_q, N_v] the clip score alone (official: there is no fusion)."""
        return self.score_branches(queries, videos)["clip"]

    def training_scores(self, batch: TrainBatch, step: TrainingStep | None = None) -> dict[str, torch.Tensor]:
        """The matrices and internals of the training losses, in the official order of computation.

        `clip` / `clip_raw` [B_q, B_v] (cosine / raw dot of the first query pass); `rel_query_vec` (second pass);
        `moment_scores` [B_q, B_v, K], `global_scores` [B_q, B_v], `rel_hinge` [B_q]; `div_gram` [B_v, K, K],
        `div_per_video` [B_v]; `span_masks` [B_v, K, M]. With `step` (training), of the global batch: the videos'
        encodings and span internals and both query passes go through `step.gather` first.
        """
        cfg, labels = self.cfg, batch.queries.labels
        videos = self.encode_video_parts(batch.videos)
        queries = self.encode_queries(batch.queries)
        rel_queries = self.encode_queries(batch.queries)  # a second pass (own dropout mask), as officially
        if step is not None:
            encoded, gathered = step.gather(vars(videos), {"queries": queries, "rel_queries": rel_queries})
            videos, labels = AMDNetVideos(**encoded), step.labels
            queries, rel_queries = gathered["queries"], gathered["rel_queries"]
        unit = F.normalize(rel_queries, dim=-1)
        moment_scores = torch.einsum("qd,vkd->qvk", unit, F.normalize(videos.moments, dim=-1))
        global_scores = unit @ F.normalize(videos.global_vec, dim=-1).t()
        rows = torch.arange(len(labels), device=labels.device)
        best_moment = moment_scores[rows, labels].max(dim=-1).values
        gram, div_per_video = span_diversity(videos.masks, cfg.div_lambda)
        return {
            "query_vec": queries,
            "clip": self.score_branches(queries, videos.clips)["clip"],
            "clip_raw": torch.einsum("qd,vtd->qvt", queries, videos.clips).max(dim=-1).values,
            "rel_query_vec": rel_queries,
            "moment_scores": moment_scores,
            "global_scores": global_scores,
            "rel_hinge": F.relu(cfg.rel_margin + global_scores[rows, labels] - best_moment),
            "div_gram": gram,
            "div_per_video": div_per_video,
            "span_masks": videos.masks,
        }

    def add_losses(self, step: TrainingStep) -> None:
        """Losses `clip_nce`, `div` (span diversity) and `rel` (moment relevance); no negatives are drawn."""
        cfg = self.cfg
        scores = self.training_scores(step.batch, step)
        step.losses["clip_nce"] = cfg.loss_factor[0] * multi_positive_nce(scores["clip_raw"], step.labels)
        step.losses["div"] = cfg.loss_factor[1] * scores["div_per_video"].mean()
        step.losses["rel"] = cfg.rel_weight * scores["rel_hinge"].mean()
