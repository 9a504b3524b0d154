"""HLFormer (ICCV'25, lijun2005/ICCV25-HLFormer @ 332a024), faithful to the official code; state dicts load unchanged.

GMMFormer v2's design with every Gaussian branch doubled by a Lorentz-model (hyperbolic) branch, and a hyperbolic
entailment loss (fixture README §14; the Lorentz maths in `lorentz.py`, on geoopt's manifold):
- Query: projection -> positions -> transformer layer (masked) -> attention pooling -> q.
- HLFormer block: `attention_num / 2` Euclidean transformer layers `e_attns` (Gaussian widths none, 2, 4, 8, ...)
  and as many Lorentz ones `h_attns` (same widths) read the same input; a weight token, the mean of all branch
  outputs over all positions, cross-attends to each output, and per position a softmax over the branches mixes them
  (`BranchMixture`). The block length is fixed: `map_size` clips, `max_ctx_l` frames (official: 32 and 128).
- Clip and frame branches, scores and ranking terms: GMMFormer v2's (`gmmformer2.GMMFormer2Base`) with HLFormer
  blocks: frames zero-padded to `max_ctx_l` rows, their encodings zero there; S_c = max_t cos(q, E_c[v, t]);
  S_f = max over all `max_ctx_l` rows of cos(q, E_f[v, t]), zeroed pads included (so S_f >= 0 for a video shorter
  than that); raw dot versions for the NCE terms; fused 0.7 S_c + 0.3 S_f.
- Loss: w1 NCE(S~_c) + Trip(S_c) + w2 NCE(S~_f) + Trip(S_f) + w3 QDL_v2 + w4 entailment. The entailment term puts
  each query, `exp_map0(exp(textual_alpha) q)`, inside the cone of its video,
  `exp_map0(exp(video_alpha) (pool_2(E_f) + pool_3(E_c)) / 2)`, on the hyperboloid of curvature exp(`curv`);
  QDL and the hyperbolic query use a second query-encoder pass (its own dropout mask), as officially.

Official quirks kept by default, each with a named fix (README §14.11 points 3-5):
- `masked_weight_token`: the weight token averages over the real frames only (officially over all rows, pads too);
- `mask_frame_pads`: the frame score is a max over real frames only (officially the zeroed pads take part);
- `masked_hyp_pool`: the hyperbolic frame pooling ignores padded rows (officially unmasked).
The forward clamps `curv` to [log(curv_init / 10), log(10 curv_init)], `textual_alpha`, `video_alpha` and every
`scale_alpha` to <= 0 in place, as officially (a loaded official checkpoint already satisfies them).
Initialisation: the family's (`init_weights`) over the official parameter initial values (log-scale alphas, curvature
log 1, Lorentz attention scale sqrt(d_L + 1), LorentzLinear scale 2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stages.models.baselines.base import Encodings, TrainingStep
from stages.models.baselines.data import TrainBatch
from stages.models.baselines.gmmformer2 import GMMFormer2Base, GMMFormer2BaseConfig
from stages.models.baselines.layers import (
    BranchMixture,
    InputProjection,
    TransformerLayer,
    attention_pool,
    init_weights,
)
from stages.models.baselines.lorentz import HLFormerLorentz, LorentzSelfAttention, entailment_loss, exp_map0
from stages.models.registry import register_model


@dataclass(frozen=True)
class HLFormerConfig(GMMFormer2BaseConfig):
    """HLFormer settings (defaults: the official TVR configuration, with CLIP ViT-B/32 input sizes; ActivityNet and
    Charades-STA: sft_factor 0.6; the 4th loss factor weighs the entailment loss)."""

    lorentz_dim: int = 127  # d_L: the Lorentz model dimension d_L + 1 must be a multiple of n_heads
    attention_num: int = 8  # branches of a block: half Euclidean, half Lorentz, widths none, 2, 4, ...
    curv_init: float = 1.0  # initial curvature c of the entailment space
    learn_curv: bool = True
    loss_factor: tuple[float, float, float, float] = (0.05, 0.04, 8e-5, 1e-3)  # clip NCE, frame NCE, QDL, entailment
    entailment_min_radius: float = 0.1
    masked_weight_token: bool = False  # fix: the frame block's weight token averages over real frames only
    masked_hyp_pool: bool = False  # fix: the hyperbolic frame pooling ignores the padded rows

    @property
    def gauss_widths(self) -> tuple[float | None, ...]:
        """The Gaussian width of each branch of one geometry: none, then 2^i."""
        return (None, *(2.0**i for i in range(1, self.attention_num // 2)))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_num < 2 or self.attention_num % 2:
            raise ValueError(f"attention_num must be an even number >= 2, not {self.attention_num}")
        if (self.lorentz_dim + 1) % self.n_heads:
            raise ValueError(f"lorentz_dim + 1 = {self.lorentz_dim + 1} is not a multiple of {self.n_heads} heads")
        if self.map_size > self.max_ctx_l:
            raise ValueError(f"map_size {self.map_size} exceeds the position table (max_ctx_l {self.max_ctx_l})")


class HLFormerBlock(BranchMixture):
    """Euclidean and Lorentz attention branches over one input, mixed per position (the official `HLFormerBlock`)."""

    def __init__(self, cfg: HLFormerConfig, length: int, manifold: HLFormerLorentz, masked_token: bool = False) -> None:
        super().__init__()
        dim, heads, drop, eps = cfg.hidden_size, cfg.n_heads, cfg.drop, cfg.layer_norm_eps
        self.masked_token = masked_token
        self.e_attns = nn.ModuleList(
            TransformerLayer(dim, heads, drop, 4 * dim, width, eps) for width in cfg.gauss_widths
        )
        self.h_attns = nn.ModuleList(
            TransformerLayer(
                dim,
                heads,
                drop,
                4 * dim,
                width,
                eps,
                LorentzSelfAttention(dim, cfg.lorentz_dim, heads, drop, manifold, eps),
            )
            for width in cfg.gauss_widths
        )
        self._add_mixer(dim, heads, drop, length, cfg.sft_factor, eps)

    def weight_token(self, branches: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1, D]: the mean of the branch outputs [B, K, L, D] over branches and positions (all positions unless
        `masked_token`, then the positions where `mask` is 1)."""
        mean = branches.mean(dim=1)
        if not self.masked_token or mask is None:
            return mean.mean(dim=1, keepdim=True)
        return (mean * mask[..., None]).sum(dim=1, keepdim=True) / mask.sum(dim=1)[:, None, None]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, length, D], key mask [B, length] (None: no padding) -> [B, length, D]."""
        self.check_length(x)
        branches = torch.stack([branch(x, mask) for branch in (*self.e_attns, *self.h_attns)], dim=1)
        return self.mix(branches, self.weight_token(branches, mask), mask)


@register_model("hlformer", config=HLFormerConfig)
class HLFormer(GMMFormer2Base):
    """Hyperbolic-Lorentzian transformer (parameter names and order as in the official module)."""

    cfg: HLFormerConfig

    def __init__(self, cfg: HLFormerConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or HLFormerConfig()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.curv = nn.Parameter(torch.tensor(math.log(cfg.curv_init)), requires_grad=cfg.learn_curv)
        self.textual_alpha = nn.Parameter(torch.tensor(dim**-0.5).log())
        self.video_alpha = nn.Parameter(torch.tensor(dim**-0.5).log())
        self.manifold = HLFormerLorentz(k=1.0, learnable=False)
        self._add_input_modules(query_encoder=TransformerLayer(dim, cfg.n_heads, cfg.drop, 4 * dim, eps=eps))
        self.clip_encoder = HLFormerBlock(cfg, cfg.map_size, self.manifold)
        self.frame_input_proj = InputProjection(cfg.visual_input_size, dim, cfg.input_drop, eps)
        self.frame_encoder_1 = HLFormerBlock(cfg, cfg.max_ctx_l, self.manifold, cfg.masked_weight_token)
        self.modular_vector_mapping = nn.Linear(dim, 1, bias=False)
        self.modular_vector_mapping_2 = nn.Linear(dim, 1, bias=False)
        self.modular_vector_mapping_3 = nn.Linear(dim, 1, bias=False)
        self.apply(init_weights)

    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """An HLFormer block (its weight token is its own; HLFormer has no clip key bias)."""
        return block(hidden, mask)

    def loss_inputs(self, batch: TrainBatch) -> tuple[Encodings, Encodings]:
        """The second query pass and, per video, the frame mask padded to max_ctx_l (the hyperbolic pooling's)."""
        per_video, per_query = super().loss_inputs(batch)
        _, frame_mask = self.pad_frames(batch.videos.frame_feats, batch.videos.frame_mask)
        return per_video | {"frame_mask": frame_mask}, per_query

    def hyperbolic_embeddings(
        self, queries: torch.Tensor, clips: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Query and video points (space components) of the entailment space and its curvature `curv`.

        Clamps `curv`, `textual_alpha` and `video_alpha` in place first, as the official training forward does.
        """
        cfg = self.cfg
        self.curv.data.clamp_(min=math.log(cfg.curv_init / 10), max=math.log(cfg.curv_init * 10))
        self.textual_alpha.data.clamp_(max=0.0)
        self.video_alpha.data.clamp_(max=0.0)
        curv = self.curv.exp()
        pool_mask = frame_mask if cfg.masked_hyp_pool else torch.ones_like(frame_mask)
        frame_pool = attention_pool(frames, pool_mask, self.modular_vector_mapping_2)
        clip_pool = attention_pool(clips, torch.ones_like(clips[..., 0]), self.modular_vector_mapping_3)
        return {
            "query": exp_map0(self.textual_alpha.exp() * queries, curv),
            "video": exp_map0(self.video_alpha.exp() * (frame_pool + clip_pool) / 2, curv),
            "curv": curv,
            "frame_pool": frame_pool,
            "clip_pool": clip_pool,
        }

    def add_losses(self, step: TrainingStep) -> None:
        """Losses `clip_nce`, `clip_trip`, `frame_nce`, `frame_trip` (each trip with `_t2v`, `_v2t`), `qdl`, `pop`
        (the weighted entailment loss; the unweighted one is reported as `entailment`).

        `ranks` keys: `clip_t2v`, `clip_v2t`, `frame_t2v`, `frame_v2t`; negatives are returned under the same keys.
        """
        cfg = self.cfg
        scores = self.training_scores(step.batch, step)
        self.add_ranking_losses(step, scores)
        self.add_query_diversity(step, scores)
        points = self.hyperbolic_embeddings(
            scores["second_query_vec"], scores["clips"], scores["frames"], scores["frame_mask"]
        )
        entailment = entailment_loss(
            points["video"][step.labels], points["query"], points["curv"], cfg.entailment_min_radius
        )
        step.losses["pop"] = cfg.loss_factor[3] * entailment["loss"]
        step.parts["entailment"] = entailment["loss"]
