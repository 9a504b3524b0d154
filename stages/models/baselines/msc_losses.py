"""MSC-PRVR's two losses: text-correlation distillation (RKD) and video-level cross-branch alignment.

- `txt_rkd`: relational knowledge distillation (distance and angle terms, smooth L1) from the CLIP sentence feature
  of each query (the teacher) to its query vector (the student).
- `vidlvlctl`, per training video: the intra-video clip similarity ratio (connected components of the graph
  cos(C_i, C_j) > sim_thr over the input clips) picks an adaptive number of segments; the projected encoded clips
  are merged down to it by bipartite matching (even against odd positions, greedy in descending cosine of the
  current clip features, merged rows are size-weighted averages); then every projected frame is contrasted with
  its own segment against the others (frame-to-clip) and every segment with its frames (clip-to-frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PDIST_EPS = 1e-12  # clamp of the squared distances
ALIGNMENT_EPS = 1e-8


def pairwise_distances(rows: torch.Tensor) -> torch.Tensor:
    """[N, N] Euclidean distances `sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12))`, exactly 0 on the diagonal."""
    squared = (rows * rows).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * rows @ rows.t()).clamp(min=PDIST_EPS).sqrt()
    return distances * (1 - torch.eye(len(rows), dtype=rows.dtype, device=rows.device))


def _normalised_distances(rows: torch.Tensor) -> torch.Tensor:
    distances = pairwise_distances(rows)
    return distances / distances[distances > 0].mean()


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean smooth L1 between the two sets' pairwise distances, each divided by its mean positive distance."""
    with torch.no_grad():
        target = _normalised_distances(teacher)
    return F.smooth_l1_loss(_normalised_distances(student), target)


def _angles(rows: torch.Tensor) -> torch.Tensor:
    """[N, N, N] cosines `e_ij . e_ik` of the unit differences e_ij = normalize(r_j - r_i) (0 for i = j)."""
    directions = F.normalize(rows[None, :, :] - rows[:, None, :], dim=2)
    return directions @ directions.transpose(1, 2)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean smooth L1 between the two sets' angle tensors (all N^3 entries)."""
    with torch.no_grad():
        target = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), target)


def intra_video_ratio(clip_feats: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B] share of ordered clip pairs (i != j) in one connected component of the graph cos(C_i, C_j) > threshold.

    clip_feats [B, M, d]: the model's input clip rows (normalised again here).
    """
    unit = F.normalize(clip_feats.detach(), dim=-1)
    linked = (unit @ unit.transpose(1, 2) > threshold) | torch.eye(unit.shape[1], dtype=torch.bool, device=unit.device)
    reach = linked.float()
    while True:  # transitive closure by repeated squaring
        wider = ((reach @ reach) > 0).float()
        if torch.equal(wider, reach):
            break
        reach = wider
    num_clips = unit.shape[1]
    return (reach.sum(dim=(1, 2)) - num_clips) / (num_clips * (num_clips - 1))


def adaptive_rank(ratio: float, ranks: Sequence[tuple[float, int]], default: int) -> int:
    """The segment count of a video: the rank of the first (threshold, rank) with ratio >= threshold, else default."""
    return next((rank for threshold, rank in ranks if ratio >= threshold), default)


@dataclass
class Segments:
    """Merged tokens of one video."""

    values: torch.Tensor  # [N, D] the merged rows (projected encoded clips)
    metric: torch.Tensor  # [N, d] the merged clip features that decide the matching
    sizes: torch.Tensor  # [N] frames per token
    frame_labels: torch.Tensor  # [L] token index of each frame


def _merged_rows(rows: torch.Tensor, first: torch.Tensor, second: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Row `first[i]`, or the size-weighted average `(w_a x_a + w_b x_b) / (w_a + w_b)` where it has a partner."""
    w1, w2 = sizes[first, None], sizes[second, None]
    merged = (w1 * rows[first] + w2 * rows[second]) / (w1 + w2)
    return torch.where((first != second)[:, None], merged, rows[first])


def bipartite_merge(segments: Segments, target: int) -> Segments:
    """Merge `len - target` pairs (even position, odd position), greedily in descending cosine of the metric rows.

    Pairs are visited in descending score order (stable, ties a-major); a pair is taken when neither token is taken
    yet. Walking the positions in order, a matched even token emits the size-weighted average of the pair, its odd
    partner nothing, every other token itself; frames follow their token.
    """
    count = len(segments.sizes)
    merges = count - target
    if not 0 <= merges <= count // 2:
        raise ValueError(f"cannot merge {count} tokens into {target} by bipartite matching")
    unit = F.normalize(segments.metric.detach(), dim=-1)
    scores = (unit[0::2] @ unit[1::2].t()).cpu().numpy()
    order = np.argsort(-scores.ravel(), kind="stable")
    partner: dict[int, int] = {}
    taken_odd: set[int] = set()
    for flat in order:
        if len(partner) == merges:
            break
        row, column = divmod(int(flat), scores.shape[1])
        even, odd = 2 * row, 2 * column + 1
        if even not in partner and odd not in taken_odd:
            partner[even] = odd
            taken_odd.add(odd)
    kept = [p for p in range(count) if p not in taken_odd]
    new_index = torch.empty(count, dtype=torch.long)
    for index, position in enumerate(kept):
        new_index[position] = index
        if position in partner:
            new_index[partner[position]] = index
    device = segments.sizes.device
    first = torch.tensor(kept, device=device)
    second = torch.tensor([partner.get(p, p) for p in kept], device=device)
    sizes = segments.sizes
    return Segments(
        values=_merged_rows(segments.values, first, second, sizes),
        metric=_merged_rows(segments.metric, first, second, sizes),
        sizes=torch.where(first != second, sizes[first] + sizes[second], sizes[first]),
        frame_labels=new_index.to(device)[segments.frame_labels],
    )


def merge_to_rank(segments: Segments, rank: int, targets: Sequence[int]) -> Segments:
    """Merge step by step through `targets` (descending) down to `rank` (no merge when rank >= the token count)."""
    for target in targets:
        if target < rank or target >= len(segments.sizes):
            continue
        segments = bipartite_merge(segments, target)
    return segments


def frame_segment_alignment(
    frames: torch.Tensor, segments: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame-to-clip, clip-to-frame) contrast of frames [L, D] and segments [S, D], labels [L] = each frame's segment.

    With e = exp(sim - max) per frame (per segment), a frame's positive and negative mean similarities are p and n, and
    the loss is mean -log(p / (p + n + 1e-8)) over frames; clip-to-frame is the same over segments without the 1e-8.
    """
    sim = frames @ segments.t()
    positive = (labels[:, None] == torch.arange(len(segments), device=labels.device)[None]).to(sim.dtype)
    negative = 1 - positive

    def means(exp_sim: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = (exp_sim * positive).sum(dim) / (positive.sum(dim) + ALIGNMENT_EPS)
        neg = (exp_sim * negative).sum(dim) / (negative.sum(dim) + ALIGNMENT_EPS)
        return pos, neg

    pos, neg = means(torch.exp(sim - sim.max(dim=1, keepdim=True).values), 1)
    frame_to_clip = -torch.log(pos / (pos + neg + ALIGNMENT_EPS)).mean()
    pos, neg = means(torch.exp(sim - sim.max(dim=0, keepdim=True).values), 0)
    clip_to_frame = -torch.log(pos / (pos + neg)).mean()
    return frame_to_clip, clip_to_frame


@dataclass
class VideoAlignment:
    """The video-level alignment of a training batch, video by video."""

    ratio: torch.Tensor  # [B] intra-video clip similarity ratio
    ranks: list[int]  # segments per video
    segments: list[Segments]  # the merged segments of each video
    frame_to_clip: torch.Tensor  # [B]
    clip_to_frame: torch.Tensor  # [B]

    @property
    def per_video(self) -> torch.Tensor:
        """[B] the unweighted loss of each video."""
        return self.frame_to_clip + self.clip_to_frame


def video_level_alignment(
    clip_feats: torch.Tensor,
    clip_sizes: torch.Tensor,
    frame_labels: torch.Tensor,
    clip_proj: torch.Tensor,
    frame_proj: torch.Tensor,
    threshold: float,
    ranks: Sequence[tuple[float, int]],
) -> VideoAlignment:
    """MSC's video-level alignment of every batch video.

    Args:
        clip_feats: [B, M, d_v] the model's input clip rows (they decide the ranks and the matching).
        clip_sizes: [B, M] frames merged into each clip by the preprocessing.
        frame_labels: [B, L] the clip of each frame row.
        clip_proj: [B, M, D] the projected encoded clips (the segments start from them).
        frame_proj: [B, L, D] the projected encoded frames.
        threshold: sim_thr of the similarity graph.
        ranks: (threshold, rank) pairs, descending; a ratio below every threshold keeps all M clips.
    """
    ratio = intra_video_ratio(clip_feats, threshold)
    num_clips = clip_feats.shape[1]
    targets = sorted((rank for _, rank in ranks), reverse=True)
    chosen, merged, f2c, c2f = [], [], [], []
    for video in range(len(clip_feats)):
        rank = adaptive_rank(float(ratio[video]), ranks, num_clips)
        start = Segments(clip_proj[video], clip_feats[video], clip_sizes[video], frame_labels[video])
        segments = merge_to_rank(start, rank, targets)
        frame_to_clip, clip_to_frame = frame_segment_alignment(
            frame_proj[video], segments.values, segments.frame_labels
        )
        chosen.append(rank)
        merged.append(segments)
        f2c.append(frame_to_clip)
        c2f.append(clip_to_frame)
    return VideoAlignment(ratio, chosen, merged, torch.stack(f2c), torch.stack(c2f))
