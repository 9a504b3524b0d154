"""GMMFormer v2 (huangmozhi9527/GMMFormer_v2 @ 5bacac9), faithful to the official code; state dicts load unchanged.

- Query: projection -> positions -> one post-LN transformer layer (FFN 4 D, no attention output projection) ->
  attention pooling -> q.
- Clip branch: clip tensor [M, d_v] -> projection -> positions -> DyGMM block of length M (no mask) -> E_c [B, M, D].
- Frame branch: frames right-padded with zero rows (mask 0) to exactly max_ctx_l inside the model -> projection ->
  positions -> DyGMM block of length max_ctx_l (masked) -> rows at padded positions set to zero -> E_f.
- DyGMM block: eight transformer layers with Gaussian widths [none, 0.5, 1, 5, 10, 3, 0.1, 8] read the same input;
  one learned `weight_token`, shared by both blocks, cross-attends to each branch output (one cross-attention
  layer per block, FFN D, the block's key mask); `layer2(ReLU(layer1(tokens)))` gives a logit per branch and
  position, and the output is the per-position softmax over the branches of logits / sft_factor mixing them.
  The official code hard-wires the block lengths to 32 (clips) and 128 (frames); here they are map_size and
  max_ctx_l, which are 32 and 128 in every official configuration.
- S_c(q, v) = max_t cos(q, E_c[v, t]); S_f(q, v) = max_t cos(q, E_f[v, t]) over all max_ctx_l rows: the zeroed pads
  take part (cos(q, 0) = 0, so S_f >= 0 for every video shorter than max_ctx_l), as officially; `mask_frame_pads`
  excludes them (the clean variant, off by default). Raw dot versions for the NCE terms, by the same rule.
- Loss: w1 NCE(S~_c) + Trip(S_c) + w2 NCE(S~_f) + Trip(S_f) + w3 QDL_v2 + w4 L_OT, QDL_v2 (focal) and the Hungarian
  clip-assignment loss L_OT on a second query-encoder pass (own dropout mask), as officially.

`GMMFormer2Base` is what its descendants (MSC, HLFormer) keep: the padded frame branch, the two fixed-length
blocks, the scores, the ranking terms and the training matrices, gathered over ranks under DDP with whatever per-video
and per-query inputs the model's own losses read (`loss_inputs`), so that every batch-level term equals one process's
on the global batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.data.errors import PipelineError
from stages.models.baselines.base import BaselineConfig, BaselineModel, Encodings, TrainingStep
from stages.models.baselines.data import TrainBatch, VideoBatch
from stages.models.baselines.layers import BranchMixture, InputProjection, TransformerLayer, init_weights
from stages.models.baselines.losses import clip_assignment, clip_assignment_loss, focal_query_diverse_loss
from stages.models.registry import register_model

DYGMM_WIDTHS = (None, 0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0)  # the official branch order


@dataclass(frozen=True)
class GMMFormer2BaseConfig(BaselineConfig):
    """The settings GMMFormer v2 and its descendants share (defaults: GMMFormer v2's official TVR configuration)."""

    input_drop: float = 0.2
    drop: float = 0.2
    sft_factor: float = 0.09  # branch logits are divided by this before the softmax over branches
    loss_factor: tuple[float, float, float, float] = (0.05, 0.04, 8e-5, 0.09)  # clip NCE, frame NCE, QDL, 4th term
    neg_factor: tuple[float, float, float] = (0.15, 32.0, 1.0)  # QDL margin, scale and focal exponent
    mask_frame_pads: bool = False  # fix: padded frame rows do not take part in the frame max (official: they do)

    def __post_init__(self) -> None:
        if self.sft_factor <= 0:
            raise ValueError(f"sft_factor must be positive, got {self.sft_factor}")


@dataclass(frozen=True)
class GMMFormer2Config(GMMFormer2BaseConfig):
    """GMMFormer v2 settings (defaults: the official TVR configuration, with CLIP ViT-B/32 input sizes; the 4th
    loss factor weighs L_OT).

    Official training: lr 3e-4 (TVR), 2.5e-4 (ActivityNet), 2e-4 (Charades-STA), hard negatives from epoch 20.
    ActivityNet: sft_factor 0.6, margin 0.2, loss_factor (0.02, 0.04, 0.003, 0.11), neg_factor (0.2, 32, 1), drop 0.31;
    Charades-STA: sft_factor 0.6, margin 0.2, loss_factor (0.02, 0.04, 0.003, 0.1), neg_factor (0.2, 32, 1), drop 0.25.
    """

    dygmm_widths: tuple[float | None, ...] = DYGMM_WIDTHS  # Gaussian width per branch (None: plain attention)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dygmm_widths:
            raise ValueError("dygmm_widths needs at least one branch")


class DyGMMBlock(BranchMixture):
    """GMMFormer v2's dynamic Gaussian-mixture block over sequences of exactly `length` positions: transformer
    layers `attn0..` with their own Gaussian widths, mixed by the model's shared `weight_token` (`BranchMixture`).

    Args:
        dim: hidden size D.
        num_heads: attention heads.
        dropout: dropout of every layer.
        widths: Gaussian width of each branch (None: plain attention).
        length: the sequence length the block is built for (one branch logit per position).
        sft_factor: divisor of the branch logits.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dropout: float,
        widths: tuple[float | None, ...],
        length: int,
        sft_factor: float,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        for index, width in enumerate(widths):
            self.add_module(f"attn{index}", TransformerLayer(dim, num_heads, dropout, 4 * dim, width, eps))
        self.num_branches = len(widths)
        self._add_mixer(dim, num_heads, dropout, length, sft_factor, eps)

    def branches(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, key_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, K, L, D]: the output of every branch, each reading x [B, L, D] (mask and key bias [B, L])."""
        self.check_length(x)
        return torch.stack([getattr(self, f"attn{k}")(x, mask, key_bias=key_bias) for k in range(self.num_branches)], 1)

    def forward(
        self,
        x: torch.Tensor,
        token: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, L, D], the shared token [1, 1, D], mask [B, L] (1 = real), key_bias [B, L] -> [B, L, D]."""
        return self.mix(self.branches(x, mask, key_bias), token, mask)


@dataclass
class GMMFormer2Videos:
    """Encoded videos: what GMMFormer v2 and its descendants cache per video."""

    clips: torch.Tensor  # [B, M, D] encoded clips
    frames: torch.Tensor  # [B, max_ctx_l, D] encoded frames, zero rows at padded positions

    def pack(self) -> torch.Tensor:
        """One [B, M + max_ctx_l, D] tensor: the clips, then the frames."""
        return torch.cat([self.clips, self.frames], dim=1)

    @classmethod
    def unpack(cls, packed: torch.Tensor, num_clips: int) -> GMMFormer2Videos:
        """Inverse of `pack`."""
        return cls(packed[:, :num_clips], packed[:, num_clips:])


class GMMFormer2Base(BaselineModel):
    """GMMFormer v2's video side, scores and ranking terms (see the module docstring).

    A subclass creates `clip_input_proj` / `clip_pos_embed` (`_add_input_modules`), `clip_encoder` (a block of
    `map_size` positions), `frame_input_proj` and `frame_encoder_1` (`max_ctx_l` positions), says how a block is
    called (`run_block`) and adds its losses.
    """

    cfg: GMMFormer2BaseConfig

    @abc.abstractmethod
    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """One of the model's blocks on hidden [B, L, D] (key mask and key bias [B, L]) -> [B, L, D]."""
        raise NotImplementedError

    def clip_key_bias(self, batch: VideoBatch) -> torch.Tensor | None:
        """Additive per-clip logit bias of the clip block's self-attention (none in GMMFormer v2)."""
        return None

    def encode_clips(self, clip_feats: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """[B, M, d_v] clip tensors -> [B, M, D] encoded clips E_c (no mask)."""
        hidden = self.clip_pos_embed(self.clip_input_proj(clip_feats))
        return self.run_block(self.clip_encoder, hidden, None, key_bias)

    def pad_frames(self, frame_feats: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad frames [B, L_f, d_v] and mask [B, L_f] with zero rows (mask 0) to exactly max_ctx_l rows."""
        pad = self.cfg.max_ctx_l - frame_feats.shape[1]
        if pad < 0:
            raise PipelineError(
                f"{frame_feats.shape[1]} frame rows exceed max_ctx_l = {self.cfg.max_ctx_l}; "
                "resample the frames to max_ctx_l (the preprocessing does)"
            )
        return F.pad(frame_feats, (0, 0, 0, pad)), F.pad(frame_mask, (0, pad))

    def encode_frames(self, frame_feats: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """[B, L_f, d_v] padded frames -> [B, max_ctx_l, D] encoded frames E_f, zero at padded positions."""
        feats, mask = self.pad_frames(frame_feats, frame_mask)
        hidden = self.frame_pos_embed(self.frame_input_proj(feats))
        return self.run_block(self.frame_encoder_1, hidden, mask, None) * mask[..., None]

    def encode_video_parts(self, batch: VideoBatch) -> GMMFormer2Videos:
        """Encoded clips and frames of a block of videos."""
        return GMMFormer2Videos(
            clips=self.encode_clips(batch.clip_feats, self.clip_key_bias(batch)),
            frames=self.encode_frames(batch.frame_feats, batch.frame_mask),
        )

    def encode_videos(self, batch: VideoBatch) -> torch.Tensor:
        """[B, M + max_ctx_l, D]: the encoded clips, then the encoded frames (`GMMFormer2Videos.pack`)."""
        return self.encode_video_parts(batch).pack()

    def frame_max(self, similarities: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max, argmax) over the frame rows of similarities [N_q, N_v, L]; with `mask_frame_pads` the zero rows of
        frames [N_v, L, D] (the padded positions) are left out."""
        if self.cfg.mask_frame_pads:
            similarities = similarities.masked_fill((frames == 0).all(dim=-1)[None], float("-inf"))
        return similarities.max(dim=-1)

    def score_branches(self, queries: torch.Tensor, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"clip": S_c, "frame": S_f, "key_clip", "key_frame": their arg-maxes}, each [N_q, N_v], of packed videos."""
        parts = GMMFormer2Videos.unpack(videos, self.cfg.map_size)
        unit = F.normalize(queries, dim=-1)
        clip, key_clip = torch.einsum("qd,vtd->qvt", unit, F.normalize(parts.clips, dim=-1)).max(dim=-1)
        frame_cosine = torch.einsum("qd,vtd->qvt", unit, F.normalize(parts.frames, dim=-1))
        frame, key_frame = self.frame_max(frame_cosine, parts.frames)
        return {"clip": clip, "frame": frame, "key_clip": key_clip, "key_frame": key_frame}

    def loss_inputs(self, batch: TrainBatch) -> tuple[Encodings, Encodings]:
        """The per-video and per-query tensors that the model's losses read besides the encodings, gathered over
        ranks with them: a second query-encoder pass `second_query_vec` (own dropout mask, as officially)."""
        return {}, {"second_query_vec": self.encode_queries(batch.queries)}

    def training_scores(self, batch: TrainBatch, step: TrainingStep | None = None) -> dict[str, torch.Tensor]:
        """The [B_q, B_v] training matrices (cosine and raw dot, clip and frame), the query vectors and the encoded
        clips and frames. With `step` (training) also the model's `loss_inputs`, and all of them for the global
        batch (`step.gather`)."""
        queries = self.encode_queries(batch.queries)
        videos = self.encode_video_parts(batch.videos)
        extra: Encodings = {}
        if step is not None:
            per_video, per_query = self.loss_inputs(batch)
            encoded, gathered = step.gather(vars(videos) | per_video, {"query_vec": queries} | per_query)
            videos = GMMFormer2Videos(encoded.pop("clips"), encoded.pop("frames"))
            queries = gathered.pop("query_vec")
            extra = encoded | gathered
        branches = self.score_branches(queries, videos.pack())
        frame_raw = self.frame_max(torch.einsum("qd,vtd->qvt", queries, videos.frames), videos.frames).values
        return {
            **extra,
            "query_vec": queries,
            "clip": branches["clip"],
            "clip_raw": torch.einsum("qd,vtd->qvt", queries, videos.clips).max(dim=-1).values,
            "frame": branches["frame"],
            "frame_raw": frame_raw,
            "clips": videos.clips,
            "frames": videos.frames,
        }

    def add_ranking_losses(self, step: TrainingStep, scores: dict[str, torch.Tensor]) -> None:
        """The NCE and triplet terms of both branches (`clip_*`, then `frame_*`)."""
        for branch, nce_weight in (("clip", self.cfg.loss_factor[0]), ("frame", self.cfg.loss_factor[1])):
            step.add_ranking(branch, scores[branch], scores[f"{branch}_raw"], nce_weight)

    def add_query_diversity(self, step: TrainingStep, scores: dict[str, torch.Tensor]) -> None:
        """`qdl`: the focal query-diverse loss of the second query pass."""
        qdl = focal_query_diverse_loss(scores["second_query_vec"], step.labels, *self.cfg.neg_factor)
        step.losses["qdl"] = self.cfg.loss_factor[2] * qdl


@register_model("gmmformer2", config=GMMFormer2Config)
class GMMFormer2(GMMFormer2Base):
    """GMMFormer v2 (parameter names and order as in the official module)."""

    cfg: GMMFormer2Config

    def __init__(self, cfg: GMMFormer2Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GMMFormer2Config()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.weight_token = nn.Parameter(torch.randn(1, 1, dim))
        self._add_input_modules(query_encoder=TransformerLayer(dim, cfg.n_heads, cfg.drop, 4 * dim, eps=eps))
        self.clip_encoder = self._dygmm_block(cfg.map_size)
        self.frame_input_proj = InputProjection(cfg.visual_input_size, dim, cfg.input_drop, eps)
        self.frame_encoder_1 = self._dygmm_block(cfg.max_ctx_l)
        self.modular_vector_mapping = nn.Linear(dim, 1, bias=False)
        self.apply(init_weights)

    def _dygmm_block(self, length: int) -> DyGMMBlock:
        cfg = self.cfg
        return DyGMMBlock(
            cfg.hidden_size, cfg.n_heads, cfg.drop, cfg.dygmm_widths, length, cfg.sft_factor, cfg.layer_norm_eps
        )

    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """A DyGMM block, mixed by the shared `weight_token`."""
        return block(hidden, self.weight_token, mask, key_bias)

    def add_losses(self, step: TrainingStep) -> None:
        """Losses `clip_nce`, `clip_trip`, `frame_nce`, `frame_trip` (each trip with `_t2v`, `_v2t`), `qdl`, `ot`.

        `ranks` keys: `clip_t2v`, `clip_v2t`, `frame_t2v`, `frame_v2t`; negatives are returned under the same keys.
        """
        scores = self.training_scores(step.batch, step)
        self.add_ranking_losses(step, scores)
        self.add_query_diversity(step, scores)
        cosine, assigned = clip_assignment(scores["second_query_vec"], scores["clips"], step.labels)
        step.losses["ot"] = self.cfg.loss_factor[3] * clip_assignment_loss(cosine, assigned)
