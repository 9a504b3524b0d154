"""Prototypes (Moon et al., "Prototypes are Balanced Units for Efficient and Effective PRVR", ICCV 2025).

Rebuilt from the paper alone (no code is public): every video is stored as a fixed number L_p of prototypes per
branch, made by learnable queries that cross-attend to the video's features (§3.2); a query is scored by its best
prototype (§3.1). Four train-only objectives refine the prototypes, each behind a switch of `PrototypesConfig`:
cross-modal masked text reconstruction from the retrieved prototype (§3.3.1, `cross_recon`), uni-modal
reconstruction of the input features from all prototypes (§3.3.2, `uni_recon`), weak attention guidance from
concatenated video pairs (§3.4, `guidance`) and the orthogonal loss between prototypes (§3.5, `ortho`). The paper's
Table 4 is these four switches, its Table 5 is `num_prototypes`, its Table 6 is `prototype_generator`, its Table 8
gives the defaults. A switched-off component builds no parameters and adds no loss term.

Interface (as every baseline of `base.py`): `model(train_batch, sampling) -> (losses with "total", negatives)`;
`encode_queries(query_batch) -> [N_q, D]`, `encode_videos(video_batch) -> [N_v, 2 L_p, D]` (unit-norm clip-branch
prototypes, then frame-branch ones: all that is stored per video), `score(q, v) -> [N_q, N_v]`.

Where the paper is ambiguous (paper says X; we do Y because Z):
- Branches: "dual-branch ... identical except for the exhaustive clip modeling" (§3.1). Each branch has its own
  encoder, prototype generator and train-only decoders; the text side is the MS-SL query encoder, one pooled query
  vector for both branches (as MS-SL and GMMFormer). Two branches of 30 x 384 float32 prototypes are 0.09 MB per
  video, the storage of the paper's Tables 1 and 5, which supports two branches at D = 384.
- Encoders: "a stack of encoding layers". We use the MS-SL encoder (input projection, trainable positions, one
  attention block), the code base the exhaustive clip modeling [9] comes from.
- Exhaustive clip modeling [9]: every contiguous span of the 32 encoded clips, mean-pooled (528 spans, MS-SL's
  `multi_scale_proposals`).
- Prototype generator (Eq. 1): "only cross-attention". Multi-head attention from the prototypes to the video rows,
  output projection, residual and post-LayerNorm (the encoders' attention block with queries and keys from different
  sequences), no feed-forward; the same weights in all K iterations (slot-attention style). The learnable
  prototypes start from N(0, 0.02), the initialisation of every weight of the MS-SL family. Table 6's rivals,
  Perceiver-style latents (a) and slot attention (b), are `prototype_generator` values, built as
  `prototype_generators` describes.
- Scores and retrieval loss: `S(q, v) = max_j cos(q, p_j)`. L_ret is GMMFormer's (whose lambda_nce the paper
  follows, App. 8): lambda_nce x multi-positive InfoNCE on raw dot products + clip-style triplet on cosines, in each
  branch. Inference fuses the branches like MS-SL/GMMFormer (0.7 clip + 0.3 frame); the paper does not say.
- Cross-modal reconstruction (Eq. 2-4). The mask ratio is not given: we mask 15% (BERT) of the word positions,
  never the first and last token (CLIP's SOT and EOT; EOT carries the sentence). M is drawn once per batch (the
  paper's simplification) among positions that are a word in at least one query. Masked tokens become a learnable
  embedding; trainable positions follow fc_q (without them all masked positions would decode alike). With one key
  (the prototype) the cross-attention weight is 1 for every token, so CA reduces exactly to adding a linear map of
  p* to every token (fc_v with the value and output maps folded in; fc_k has no effect and is left out). A linear
  map returns to d_t for the cosine InfoNCE of Eq. 4 against every masked backbone token of the batch, averaged over
  masked tokens. Eq. 4 has no temperature (`crecon_temperature` = 1).
- Uni-modal reconstruction (Eq. 5): "an MLP decoder, broadcast to L^f". We use the spatial broadcast decoder of
  slot attention [38], which the paper cites for it: prototype + trainable position -> 2-layer MLP -> a feature and a
  mixing logit; a softmax over prototypes mixes the features. The output layer is linear, so the hidden states are
  mixed first (same function, L_p times less memory). Each branch reconstructs its own inputs (frames / 32 clips,
  after the shared preprocessing); Eq. 5 is summed over dimensions and averaged over valid rows, then videos.
- Weak guidance (Eq. 7): "concatenate two videos at a higher frame rate". Mixture i is video i (every second row)
  followed by video i+1 of the batch (cyclically, every second row); in the frame branch the valid rows are packed
  together. Each query meets both mixtures holding its video (label 1 as first, 0 as second), so labels are
  balanced. The retrieved prototype is the mixture's prototype most similar to the query; a_1 is its head-averaged
  attention (last iteration) on rows of the first video, where a clip-branch span counts by the share of its clips
  that come from the first video. Batches of one video give 0.
- Orthogonal loss (Eq. 8) on cosine similarities ("applied only when their cosine similarity is positive"), with the
  Frobenius norm (`ortho_norm`), averaged over videos.
- Every auxiliary loss is computed per branch and summed over the branches, like the retrieval loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.models.baselines.base import BaselineConfig, BaselineModel, MomentUnits, TrainingStep, clip_windows
from stages.models.baselines.data import QueryBatch, VideoBatch
from stages.models.baselines.layers import (
    AttentionBlock,
    InputProjection,
    PositionalEncoding,
    init_weights,
)
from stages.models.baselines.msl import multi_scale_proposals, multi_scale_windows
from stages.models.baselines.preprocessing import frame_ranges
from stages.models.baselines.prototype_generators import (
    PerceiverGenerator,
    PrototypeGenerator,
    SlotAttentionGenerator,
)
from stages.models.baselines.prototypes_losses import (
    attention_guidance_loss,
    masked_token_nce,
    orthogonal_loss,
    reconstruction_error,
    sample_shared_mask,
)
from stages.models.registry import register_model

BRANCHES = ("clip", "frame")


@dataclass(frozen=True)
class PrototypesConfig(BaselineConfig):
    """Prototypes settings: the shared baseline core plus the paper's components (defaults: Table 8, TVR).

    Inherited: input sizes (CLIP ViT-B/32: 512; the paper uses CLIP-L/14: 768), D = 384, 4 heads, max_ctx_l 128,
    max_desc_l, map_size 32, dropouts, triplet margin (0.1 = GMMFormer TVR; 0.2 for ActivityNet) and the inference
    fusion weights clip_scale_w / frame_scale_w (0.7 / 0.3).
    """

    # prototypes (§3.2)
    num_prototypes: int = 30  # L_p per branch (§4.2, Table 5 sweeps 10, 20, 30, 60)
    prototype_iterations: int = 1  # K of Eq. 1 (Table 8: 1 with CLIP; App. 8: 6 with RoBERTa text), every generator
    # Table 6: cross_attention (c, the paper's) | perceiver (a) | slot_attention (b); see `prototype_generators`
    prototype_generator: Literal["cross_attention", "perceiver", "slot_attention"] = "cross_attention"
    exhaustive_clips: bool = True  # clip-branch prototypes attend to all clip spans (§3.1, [9]); False: the 32 clips
    # retrieval loss L_ret (Eq. 9, App. 8)
    nce_weight: float = 0.03  # lambda_nce on each branch's InfoNCE (Table 8: TVR 0.03, ActivityNet/QVHighlights 0.06)
    # cross-modal mask reconstruction (§3.3.1, Eq. 2-4; Table 4 "C.Recon")
    cross_recon: bool = True
    cross_recon_weight: float = 0.1  # lambda_crecon (Table 8)
    mask_ratio: float = 0.15  # share of word positions in M (not in the paper; BERT's ratio)
    crecon_temperature: float = 1.0  # divides the cosine logits of Eq. 4 (the paper has none)
    # uni-modal reconstruction (§3.3.2, Eq. 5; Table 4 "U.Recon")
    uni_recon: bool = True
    uni_recon_weight: float = 1.0  # lambda_urecon (Table 8)
    # weak guidance from concatenated video pairs (§3.4, Eq. 7; Table 4 "Guide")
    guidance: bool = True
    guidance_weight: float = 0.005  # lambda_attn (Table 8)
    guidance_margin: float = 0.2  # beta (Table 8)
    # prototype diversification (§3.5, Eq. 8; Table 4 "P.Div.")
    ortho: bool = True
    ortho_weight: float = 0.01  # lambda_ortho (Table 8; App. 8: 0.3 for ActivityNet with RoBERTa text)
    ortho_norm: Literal["fro", "l1"] = "fro"  # the matrix norm of Eq. 8

    def __post_init__(self) -> None:
        if self.num_prototypes < 1 or self.prototype_iterations < 1:
            raise ValueError("num_prototypes and prototype_iterations must be >= 1")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")


def build_generator(cfg: PrototypesConfig) -> nn.Module:
    """The prototype generator of `cfg.prototype_generator` (Table 6; see `prototype_generators`)."""
    count, dim, iterations, eps = cfg.num_prototypes, cfg.hidden_size, cfg.prototype_iterations, cfg.layer_norm_eps
    if cfg.prototype_generator == "perceiver":
        return PerceiverGenerator(count, dim, cfg.n_heads, iterations, eps)
    if cfg.prototype_generator == "slot_attention":
        return SlotAttentionGenerator(count, dim, iterations, eps)
    return PrototypeGenerator(count, dim, cfg.n_heads, iterations, cfg.drop, eps)


class BroadcastDecoder(nn.Module):
    """§3.3.2: decode every prototype at every position, mix the decodings with a softmax over prototypes.

    `h_jt = relu(W p_j + b + E_t)`, `x_jt = A h_jt + a`, `w_jt = softmax_j(u . h_jt + c)`; the output
    `sum_j w_jt x_jt` is computed as `A (sum_j w_jt h_jt) + a`, equal because the output layer is linear.
    """

    def __init__(self, hidden: int, out_dim: int, max_positions: int) -> None:
        super().__init__()
        self.prototype_in = nn.Linear(hidden, hidden)
        self.positions = nn.Embedding(max_positions, hidden)
        self.mixing = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, prototypes: Tensor, length: int) -> Tensor:
        """prototypes [B, L_p, D] -> [B, length, out_dim]."""
        hidden = F.relu(self.prototype_in(prototypes)[:, :, None] + self.positions.weight[:length])  # [B, L_p, L, D]
        weights = self.mixing(hidden).softmax(dim=1)
        return self.out((weights * hidden).sum(dim=1))


class MaskedTextDecoder(nn.Module):
    """Eq. 3: `SA(CA(fc_q(T_masked); fc_k(p*); fc_v(p*)))`, mapped back to the backbone token space.

    The cross-attention has a single key, the retrieved prototype, so every token attends to it with weight 1 and
    the layer is exactly `LN(h + Dropout(W_o W_v fc_v(p*)))`, one linear map of p*: that is what is computed, with
    the three maps folded into `fc_v` (the query and key maps of a literal attention layer would get no gradient).
    """

    def __init__(self, cfg: PrototypesConfig) -> None:
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.mask_embedding = nn.Parameter(torch.empty(cfg.query_input_size).normal_(0.0, 0.02))
        self.fc_q = nn.Linear(cfg.query_input_size, dim)
        self.position = PositionalEncoding(cfg.max_desc_l, dim, cfg.drop, eps)
        self.fc_v = nn.Linear(dim, dim)
        self.cross_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(cfg.drop)
        self.self_attention = AttentionBlock(dim, cfg.n_heads, cfg.drop, eps=eps)
        self.to_text = nn.Linear(dim, cfg.query_input_size)

    def forward(self, tokens: Tensor, token_mask: Tensor, masked: Tensor, prototype: Tensor) -> Tensor:
        """tokens [N, L, d_t], token_mask [N, L], masked [N, L] bool, prototype [N, D] -> [N, L, d_t]."""
        inputs = torch.where(masked[..., None], self.mask_embedding.to(tokens.dtype), tokens)
        hidden = self.position(self.fc_q(inputs))
        attended = self.dropout(self.fc_v(prototype))[:, None]
        hidden = self.cross_norm(hidden + attended)
        return self.to_text(self.self_attention(hidden, token_mask))


class VideoBranch(nn.Module):
    """One branch: projection -> positions -> attention block -> (all spans) -> prototypes; plus train-only decoders."""

    def __init__(self, cfg: PrototypesConfig, max_rows: int, exhaustive: bool) -> None:
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.exhaustive = exhaustive
        self.input_proj = InputProjection(cfg.visual_input_size, dim, cfg.input_drop, eps)
        self.pos_embed = PositionalEncoding(max_rows, dim, cfg.drop, eps)
        self.encoder = AttentionBlock(dim, cfg.n_heads, cfg.drop, eps=eps)
        self.generator = build_generator(cfg)
        self.row_decoder = BroadcastDecoder(dim, cfg.visual_input_size, max_rows) if cfg.uni_recon else None
        self.text_decoder = MaskedTextDecoder(cfg) if cfg.cross_recon else None

    def forward(self, rows: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """rows [B, L, d_v], mask [B, L] (None: no padding) -> (prototypes [B, L_p, D], attention [B, L_p, U])."""
        hidden = self.encoder(self.pos_embed(self.input_proj(rows)), mask)
        if self.exhaustive:
            if mask is not None:
                raise ValueError("exhaustive span modelling needs unpadded rows")
            hidden = multi_scale_proposals(hidden)
        return self.generator(hidden, mask)

    def first_video_share(self, first: Tensor) -> Tensor:
        """[B, L] 1 where an input row comes from the first video -> [B, U] first-video share of each attended row."""
        return multi_scale_proposals(first[..., None]).squeeze(-1) if self.exhaustive else first


def prototype_scores(queries: Tensor, prototypes: Tensor) -> Tensor:
    """`max_j q . p_j` for every (query, video): queries [N_q, D], prototypes [N_v, L_p, D] -> [N_q, N_v]."""
    return torch.einsum("qd,vpd->qvp", queries, prototypes).amax(dim=-1)


def best_prototype(queries: Tensor, prototypes: Tensor) -> Tensor:
    """Index of the prototype most similar (cosine) to each query: queries [N, D], prototypes [N, L_p, D] -> [N]."""
    return torch.einsum("nd,npd->np", F.normalize(queries, dim=-1), F.normalize(prototypes, dim=-1)).argmax(dim=1)


def mix_video_pairs(rows: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """§3.4: video i at double rate (rows 0, 2, 4, ...) followed by video i+1 (cyclic) at double rate.

    The mixture has as many rows as the input: for an odd length the second video loses its last kept row.

    Args:
        rows: [B, L, d] features of B >= 2 videos.
        mask: [B, L] 1 for valid rows, or None when every row is valid.

    Returns:
        mixed rows [B, L, d], their mask (None when the input had none) and [B, L] 1.0 where a row comes from the
        first video. With a mask, the valid rows of both videos are packed at the front.
    """
    length = rows.shape[1]
    half = rows[:, ::2]
    mixed = torch.cat([half, half.roll(-1, dims=0)[:, : length // 2]], dim=1)
    first = (torch.arange(length, device=rows.device) < half.shape[1]).to(rows.dtype).expand(len(rows), -1)
    if mask is None:
        return mixed, None, first
    half_mask = mask[:, ::2]
    mixed_mask = torch.cat([half_mask, half_mask.roll(-1, dims=0)[:, : length // 2]], dim=1)
    order = torch.argsort(mixed_mask == 0, dim=1, stable=True)
    return mixed.gather(1, order[..., None].expand_as(mixed)), mixed_mask.gather(1, order), first.gather(1, order)


@register_model("prototypes", config=PrototypesConfig)
class Prototypes(BaselineModel):
    """The Prototypes PRVR model (see the module docstring)."""

    def __init__(self, cfg: PrototypesConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PrototypesConfig()
        self._add_input_modules(video_inputs=False)
        self.modular_vector_mapping = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.branches = nn.ModuleDict(
            {
                "clip": VideoBranch(cfg, cfg.map_size, exhaustive=cfg.exhaustive_clips),
                "frame": VideoBranch(cfg, cfg.max_ctx_l, exhaustive=False),
            }
        )
        self.apply(init_weights)

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def encode_videos(self, batch: VideoBatch) -> Tensor:
        """[N_v, 2 L_p, D] unit-norm prototypes, clip branch first: all that is stored per video."""
        prototypes = [self.branches[name](*self._rows(batch, name))[0] for name in BRANCHES]
        return F.normalize(torch.cat(prototypes, dim=1), dim=-1)

    def moment_units(self, batch: VideoBatch, num_frames: Sequence[int]) -> MomentUnits:
        """Every prototype, placed on the input row it attends most (a clip span, a clip or a frame)."""
        cfg = self.preprocess_config()
        clips = clip_windows(num_frames, cfg)
        length = batch.frame_feats.shape[1]
        rows = {
            "clip": multi_scale_windows(clips) if self.cfg.exhaustive_clips else clips,
            "frame": torch.stack([torch.from_numpy(frame_ranges(t, cfg)[:length] / t) for t in num_frames]).float(),
        }
        windows = []
        for name in BRANCHES:
            _, attention = self.branches[name](*self._rows(batch, name))
            focus = attention.argmax(dim=-1).cpu()  # [B, L_p]
            windows.append(rows[name].gather(1, focus[..., None].expand(-1, -1, 2)))
        return MomentUnits(torch.arange(2 * self.cfg.num_prototypes), torch.cat(windows, dim=1))

    def score_branches(self, queries: Tensor, videos: Tensor) -> dict[str, Tensor]:
        """{"clip": S_c, "frame": S_f}: [N_q, N_v] best-prototype cosines of each branch."""
        unit = F.normalize(queries, dim=-1)
        clip, frame = videos.split(self.cfg.num_prototypes, dim=1)
        return {"clip": prototype_scores(unit, clip), "frame": prototype_scores(unit, frame)}

    # ---- training -----------------------------------------------------------------------------------------------
    def add_losses(self, step: TrainingStep) -> None:
        """Eq. 9: losses `<branch>_{nce,trip,crecon,urecon,attn,ortho}` (weighted, enabled terms only).

        Also `<branch>_trip_{t2v,v2t}` (parts of `<branch>_trip`, not added again). `ranks` keys: `clip_t2v`,
        `clip_v2t`, `frame_t2v`, `frame_v2t`; the negatives are returned under the same keys. `generator` also draws
        the masked word positions. The prototypes and the query vectors are encoded per rank; everything after
        `step.gather` (losses, decoders, the mixtures of the guidance) sees the global batch.
        """
        cfg, losses = self.cfg, step.losses
        query_vecs = self.encode_queries(step.batch.queries)
        encoded = {name: self.branches[name](*self._rows(step.batch.videos, name))[0] for name in BRANCHES}
        local_videos, local_queries = step.batch.videos, step.batch.queries
        video_inputs = {key: getattr(local_videos, key) for key in ("clip_feats", "frame_feats", "frame_mask")}
        query_inputs = {key: getattr(local_queries, key) for key in ("query_feats", "query_mask")}
        gathered_videos, gathered = step.gather(video_inputs | encoded, query_inputs | {"vecs": query_vecs})
        videos = VideoBatch([], **{key: gathered_videos[key] for key in video_inputs})
        queries = QueryBatch([], **{key: gathered[key] for key in query_inputs})
        query_vecs, labels = gathered["vecs"], step.labels
        masked = sample_shared_mask(queries.query_mask, cfg.mask_ratio, step.generator) if cfg.cross_recon else None
        for name in BRANCHES:
            branch = self.branches[name]
            rows, mask = self._rows(videos, name)
            prototypes = gathered_videos[name]
            cosine = prototype_scores(F.normalize(query_vecs, dim=-1), F.normalize(prototypes, dim=-1))
            step.add_ranking(name, cosine, prototype_scores(query_vecs, prototypes), cfg.nce_weight)
            if masked is not None:
                retrieved = prototypes[labels, best_prototype(query_vecs, prototypes[labels])]
                decoded = branch.text_decoder(queries.query_feats, queries.query_mask, masked, retrieved)
                nce = masked_token_nce(decoded[masked], queries.query_feats[masked], cfg.crecon_temperature)
                losses[f"{name}_crecon"] = cfg.cross_recon_weight * nce
            if branch.row_decoder is not None:
                decoded = branch.row_decoder(prototypes, rows.shape[1])
                row_mask = torch.ones_like(rows[..., 0]) if mask is None else mask
                losses[f"{name}_urecon"] = cfg.uni_recon_weight * reconstruction_error(decoded, rows, row_mask)
            if cfg.guidance:
                losses[f"{name}_attn"] = cfg.guidance_weight * self._guidance(branch, rows, mask, query_vecs, labels)
            if cfg.ortho:
                losses[f"{name}_ortho"] = cfg.ortho_weight * orthogonal_loss(prototypes, cfg.ortho_norm)

    def _guidance(
        self, branch: VideoBranch, rows: Tensor, mask: Tensor | None, query_vecs: Tensor, labels: Tensor
    ) -> Tensor:
        """Eq. 7 for every query with the two mixtures that contain its video (0 for a batch of one video)."""
        num_videos = len(rows)
        if num_videos < 2:
            return query_vecs.new_zeros(())
        mixed, mixed_mask, first = mix_video_pairs(rows, mask)
        prototypes, attention = branch(mixed, mixed_mask)
        share = branch.first_video_share(first)  # [B, U]
        mixture = torch.cat([labels, (labels - 1) % num_videos])  # mixture i holds video i first, video i + 1 second
        is_first = torch.arange(len(mixture), device=labels.device) < len(labels)
        best = best_prototype(query_vecs.repeat(2, 1), prototypes[mixture])
        first_mass = (attention[mixture, best] * share[mixture]).sum(dim=-1)
        return attention_guidance_loss(first_mass, is_first, self.cfg.guidance_margin)

    @staticmethod
    def _rows(videos: VideoBatch, name: str) -> tuple[Tensor, Tensor | None]:
        """A branch's input rows and their mask (clips are never padded)."""
        return (videos.clip_feats, None) if name == "clip" else (videos.frame_feats, videos.frame_mask)
