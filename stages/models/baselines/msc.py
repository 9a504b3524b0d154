"""MSC-PRVR (NeurIPS'25, admins97/MSC_PRVR @ 0b3e3d1), built on GMMFormer v2, faithful to the official code.

Only MSC's own parts are here; the encoders are GMMFormer v2's (`gmmformer2`), the losses' shared terms the family's.
- Preprocessing (float32, as the official HDF5 path): the raw frames are averaged to exactly max_ctx_l rows (the
  §3 bin edges in float32; fewer frames are duplicated), `F = l2n(A)` is the frame input (never sampled or padded,
  mask all ones); the clip input comes from merging the unnormalised rows A, order-preserving, in stages
  (`merge_targets`, officially 128 -> 80 -> 52 -> 32): adjacent pairs (x_2i, x_2i+1) ranked by their raw dot
  product, the N - target most similar merged into `(w_a x_a + w_b x_b) / (w_a + w_b)` with sizes w_a + w_b. The
  clips `C = l2n(merged rows)` carry their merge sizes w and each frame row its clip (`frame_labels`).
- Clip branch: GMMFormer v2's clip block with `+ log w_j` added to the key logits of its eight branches (not of its
  cross-attention); frame branch and query encoder unchanged.
- Scores: as GMMFormer v2, fused `0.4 S_c + 0.6 S_f`.
- Loss: w1 NCE(S~_c) + Trip(S_c) + w2 NCE(S~_f) + Trip(S_f) + vl_coef vidlvlctl + txt_rkd, with
  txt_rkd = rkd_d_coef RKD_D(q, t) + rkd_a_coef RKD_A(q, t) against the teacher t = the last real preprocessed
  token (the CLIP EOT feature unless the query was truncated, officially), and vidlvlctl the video-level alignment
  of `msc_losses` on `vproj_clip` of the encoded clips and frames. One query-encoder pass (no QDL, no OT);
  `loss_factor[2:]` and `neg_factor` are GMMFormer v2 leftovers the MSC loss never reads, as officially.
- Merge ties: the preprocessing ranks pairs with a stable sort; the official sort is unstable, so results with
  exactly tied pair similarities across the merge boundary (possible only for very short videos) are undefined there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stages.data.errors import PipelineError
from stages.models.baselines.base import Encodings, MomentUnits, TrainingStep
from stages.models.baselines.data import TrainBatch, VideoBatch
from stages.models.baselines.gmmformer2 import GMMFormer2, GMMFormer2Config
from stages.models.baselines.layers import init_weights
from stages.models.baselines.msc_losses import VideoAlignment, rkd_angle, rkd_distance, video_level_alignment
from stages.models.baselines.preprocessing import PreprocessConfig, bin_edges, bin_ranges, l2_normalize, resample
from stages.models.registry import register_model


@dataclass
class MergeStage:
    """The state after one order-preserving merge stage, and its decisions."""

    tokens: np.ndarray  # [target, d] merged rows
    sizes: np.ndarray  # [target] frames per row
    labels: np.ndarray  # [L] row of each averaged frame
    pair_similarity: np.ndarray  # [N / 2] raw dot product of each adjacent pair
    merged: np.ndarray  # [N / 2] bool: the pair was merged


def merge_adjacent_pairs(tokens: np.ndarray, sizes: np.ndarray, labels: np.ndarray, target: int) -> MergeStage:
    """Merge the N - target most similar pairs (x_2i, x_2i+1) of tokens [N, d] (raw dot products, float32)."""
    count = len(tokens)
    if count % 2 or not count // 2 <= target <= count:
        raise ValueError(f"cannot merge {count} rows into {target} by adjacent pairs (needs an even count >= target)")
    first, second = tokens[0::2], tokens[1::2]
    similarity = (first * second).sum(axis=-1)
    merged = np.zeros(count // 2, dtype=bool)
    merged[np.argsort(-similarity, kind="stable")[: count - target]] = True
    opens_row = np.stack([np.ones_like(merged), ~merged], axis=1).reshape(-1)  # a merged odd token joins its even one
    new_index = np.cumsum(opens_row) - 1
    out = np.empty((target, tokens.shape[1]), dtype=tokens.dtype)
    out[new_index] = tokens
    w1, w2 = sizes[0::2][merged, None], sizes[1::2][merged, None]
    out[new_index[0::2][merged]] = (w1 * first[merged] + w2 * second[merged]) / (w1 + w2)
    new_sizes = np.zeros(target, dtype=sizes.dtype)
    np.add.at(new_sizes, new_index, sizes)
    return MergeStage(out, new_sizes, new_index[labels], similarity, merged)


@dataclass(frozen=True)
class MSCPreprocessConfig(PreprocessConfig):
    """MSC's video inputs: frames averaged to max_ctx_l rows, clips merged from them (see the module docstring)."""

    merge_targets: tuple[int, ...] = (80, 52, 32)  # rows after each merge stage; the last is map_size

    def average_edges(self, num_frames: int) -> np.ndarray:
        """The bin edges that average a video's `num_frames` raw frames into max_ctx_l rows (§3, float32)."""
        return bin_edges(num_frames, self.max_ctx_l, "float32", self.clamp_last_edge)

    def average(self, frames: np.ndarray) -> np.ndarray:
        """[max_ctx_l, d_v] float32 averages of the raw frames [T, d_v] (not normalised)."""
        x = np.asarray(frames, dtype=np.float32)
        return resample(x, self.average_edges(len(x)))

    def merge_stages(self, averaged: np.ndarray) -> list[MergeStage]:
        """Every merge stage of one video's averaged rows [max_ctx_l, d_v]."""
        stages: list[MergeStage] = []
        tokens, sizes, labels = averaged, np.ones(len(averaged), np.float32), np.arange(len(averaged))
        for target in self.merge_targets:
            stages.append(merge_adjacent_pairs(tokens, sizes, labels, target))
            tokens, sizes, labels = stages[-1].tokens, stages[-1].sizes, stages[-1].labels
        return stages

    def video_inputs(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """`clip` [M, d_v], `frames` [max_ctx_l, d_v], `clip_sizes` [M] and `frame_labels` [max_ctx_l]."""
        averaged = self.average(frames)
        last = self.merge_stages(averaged)[-1]

        def normalize(x: np.ndarray) -> np.ndarray:
            return l2_normalize(x, self.l2_eps) if self.normalize else x

        return {
            "clip": normalize(last.tokens),
            "frames": normalize(averaged),
            "clip_sizes": last.sizes,
            "frame_labels": last.labels,
        }


@dataclass(frozen=True)
class MSCConfig(GMMFormer2Config):
    """MSC settings (defaults: the official TVR configuration and the README's TVR command line).

    The argparse defaults of the official script are sim_thr 0.5, rkd_d_coef 10, rkd_a_coef 20, vl_coef 0.1; the
    official configs read CLIP ViT-L/14 features (d_v = d_t = 768) with max_desc_l 77.
    """

    max_desc_l: int = 77
    clip_scale_w: float = 0.4
    frame_scale_w: float = 0.6
    merge_targets: tuple[int, ...] = (80, 52, 32)  # preprocessing merge stages from max_ctx_l rows; the last = map_size
    rkd_d_coef: float = 15.0  # weight of the RKD distance term
    rkd_a_coef: float = 30.0  # weight of the RKD angle term
    vl_coef: float = 0.1  # weight of the video-level alignment
    sim_thr: float = 0.8  # clip-graph edge threshold of the intra-video ratio
    adaptive_ranks: tuple[tuple[float, int], ...] = ((0.8, 5), (0.6, 8), (0.4, 12), (0.2, 20))  # else map_size

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.merge_targets or self.merge_targets[-1] != self.map_size:
            raise ValueError(f"the last of merge_targets {self.merge_targets} must be map_size = {self.map_size}")
        count = self.max_ctx_l
        for target in self.merge_targets:
            if count % 2 or not count // 2 <= target < count:
                raise ValueError(f"merge_targets {self.merge_targets}: {count} rows cannot be merged into {target}")
            count = target
        ranks = [rank for _, rank in self.adaptive_ranks]
        thresholds = [threshold for threshold, _ in self.adaptive_ranks]
        if (
            ranks != sorted(ranks)
            or thresholds != sorted(thresholds, reverse=True)
            or not set(ranks) <= set(range(1, self.map_size))
        ):
            raise ValueError(
                f"adaptive_ranks {self.adaptive_ranks}: thresholds must fall and ranks rise below map_size"
            )
        chain = [self.map_size, *ranks[::-1]]
        for larger, smaller in zip(chain, chain[1:], strict=False):
            if larger - smaller > larger // 2:
                raise ValueError(f"adaptive_ranks: {larger} segments cannot be merged into {smaller} in one step")

    def preprocess(self) -> MSCPreprocessConfig:
        """MSC's preprocessing for these dimensions."""
        return MSCPreprocessConfig(
            map_size=self.map_size,
            max_ctx_l=self.max_ctx_l,
            max_desc_l=self.max_desc_l,
            merge_targets=self.merge_targets,
        )


def _merged(batch: VideoBatch) -> VideoBatch:
    """`batch`, which must carry the merge of MSC's preprocessing (`clip_sizes`, `frame_labels`)."""
    if batch.clip_sizes is None or batch.frame_labels is None:
        raise PipelineError("MSC needs the clips' merge sizes: preprocess videos with the model's preprocess_config()")
    return batch


@register_model("msc", config=MSCConfig)
class MSC(GMMFormer2):
    """MSC-PRVR (parameter names and order as in the official module: GMMFormer v2's, then `vproj_clip`)."""

    cfg: MSCConfig

    def __init__(self, cfg: MSCConfig | None = None) -> None:
        super().__init__(cfg or MSCConfig())
        self.vproj_clip = nn.Linear(self.cfg.hidden_size, self.cfg.hidden_size)
        init_weights(self.vproj_clip)

    def clip_key_bias(self, batch: VideoBatch) -> torch.Tensor:
        """`log w_j`: the merge size of each clip, added to the clip block's key logits."""
        return torch.log(_merged(batch).clip_sizes)

    def moment_units(self, batch: VideoBatch, num_frames: Sequence[int]) -> MomentUnits:
        """The M merged clips, packed first; each spans the raw frames of the averaged rows merged into it (the
        merge keeps the order, so a clip's rows are consecutive)."""
        labels = _merged(batch).frame_labels.cpu().numpy()
        clips = np.arange(self.cfg.map_size)
        windows = []
        for row, total in enumerate(num_frames):
            ranges = bin_ranges(self.preprocess_config().average_edges(total))  # raw frames per row
            first = np.searchsorted(labels[row], clips, side="left")
            last = np.searchsorted(labels[row], clips, side="right") - 1
            windows.append(np.stack([ranges[first, 0], ranges[last, 1]], axis=1) / total)
        return MomentUnits(torch.from_numpy(clips), torch.from_numpy(np.stack(windows)).float())

    def loss_inputs(self, batch: TrainBatch) -> tuple[Encodings, Encodings]:
        """What the video-level alignment reads per video (the clip rows, their merge sizes, each frame row's clip)
        and the RKD teacher per query (one query-encoder pass: no second one)."""
        v = batch.videos
        per_video = {"clip_feats": v.clip_feats, "clip_sizes": v.clip_sizes, "frame_labels": v.frame_labels}
        return per_video, {"teacher": batch.queries.last_tokens()}

    def alignment(
        self,
        clip_feats: torch.Tensor,
        clip_sizes: torch.Tensor,
        frame_labels: torch.Tensor,
        clips: torch.Tensor,
        frames: torch.Tensor,
    ) -> VideoAlignment:
        """The video-level alignment (`msc_losses.VideoAlignment`) of videos with their input clip rows [B, M, d_v],
        merge sizes [B, M], frame-row clips [B, L] and encoded clips and frames."""
        cfg = self.cfg
        return video_level_alignment(
            clip_feats,
            clip_sizes,
            frame_labels,
            self.vproj_clip(clips),
            self.vproj_clip(frames),
            cfg.sim_thr,
            cfg.adaptive_ranks,
        )

    def add_losses(self, step: TrainingStep) -> None:
        """Losses `clip_nce`, `clip_trip`, `frame_nce`, `frame_trip` (each trip with `_t2v`, `_v2t`), `vidlvlctl`,
        `txt_rkd` (reported parts `txt_rkd_distance`, `txt_rkd_angle`, unweighted).

        `ranks` keys: `clip_t2v`, `clip_v2t`, `frame_t2v`, `frame_v2t`; negatives are returned under the same keys.
        """
        cfg = self.cfg
        scores = self.training_scores(step.batch, step)
        self.add_ranking_losses(step, scores)
        alignment = self.alignment(
            scores["clip_feats"], scores["clip_sizes"], scores["frame_labels"], scores["clips"], scores["frames"]
        )
        step.losses["vidlvlctl"] = cfg.vl_coef * alignment.per_video.mean()
        queries, teacher = scores["query_vec"], scores["teacher"]
        distance, angle = rkd_distance(queries, teacher), rkd_angle(queries, teacher)
        step.losses["txt_rkd"] = cfg.rkd_d_coef * distance + cfg.rkd_a_coef * angle
        step.parts |= {"txt_rkd_distance": distance, "txt_rkd_angle": angle}
