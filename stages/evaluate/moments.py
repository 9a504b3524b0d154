"""Weakly supervised moment retrieval (video corpus moment retrieval without moment labels), as ProPy's official code.

Candidates (docs/propy_official_code.md §7.2): for every (query, video) pair keep the `events_per_video` units with
the highest cosine similarity (always L2-normalised); each unit proposes its fixed normalised window times the
video's duration; the candidates of all videos are pooled and the global top `max_per_query` kept by score, with no
NMS and no boundary refinement. Scoring uses the first `max_scored` predictions: a prediction is a hit if it is in
the ground-truth video and its IoU reaches the threshold, where IoU = intersection / (max end - min start). A query
with several ground-truth windows (QVHighlights) follows the DiDeMo rule: with n >= 2 windows the prediction must
reach the threshold with at least floor(n / 2) of them. Keys look like "0.5-r10" (percent of queries).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from stages.data.errors import PipelineError
from stages.evaluate.retrieval import ScoringConfig, iter_tile_blocks, unit_similarities


@dataclass(frozen=True)
class MomentConfig:
    """Candidate generation and scoring of weakly supervised moment retrieval (official ProPy values)."""

    events_per_video: int = 10  # units kept per (query, video) pair (official `npev`)
    max_per_query: int = 1000  # predictions kept per query after pooling all videos (`max_event_per_text`)
    max_scored: int = 100  # leading predictions that are scored
    iou_thresholds: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
    recall_ks: tuple[int, ...] = (1, 10, 100)


@dataclass(frozen=True)
class MomentPredictions:
    """Ranked moment predictions, best first: [Nq, P] tensors on the CPU."""

    video: Tensor  # int64 index of the predicted video
    start: Tensor  # float32 seconds
    end: Tensor  # float32 seconds
    score: Tensor  # float32 cosine similarity of the proposing unit


def predict_moments(
    queries: Tensor,
    units: Tensor,
    unit_windows: Tensor,
    durations: Tensor,
    config: MomentConfig,
    scoring: ScoringConfig,
) -> MomentPredictions:
    """Rank moments of the whole corpus for every query, chunk by chunk on the scoring device.

    Args:
        queries: [Nq, E] query embeddings.
        units: [Nv, K, E] video units (always L2-normalised here, whatever `scoring.normalize_units` says).
        unit_windows: [K, 2] normalised [start, end] window of each unit, within [0, 1].
        durations: [Nv] video durations in seconds.
        config: candidate counts.
        scoring: device and memory budget.
    """
    num_videos, num_units = units.shape[0], units.shape[1]
    windows, durations = _check_inputs(units, unit_windows, durations)
    per_video = min(config.events_per_video, num_units)
    keep = min(config.max_per_query, num_videos * per_video)

    def top_units(query_block: Tensor, video_block: Tensor) -> tuple[Tensor, Tensor]:
        return unit_similarities(query_block, video_block, normalize_units=True).topk(per_video, dim=-1)

    blocks = iter_tile_blocks(queries, units, top_units, scoring, width=per_video, with_indices=True)
    scores, flat = [], []
    for _, values, indices in blocks:
        top_scores, candidate = values.flatten(1).topk(keep, dim=1)
        video = candidate // per_video
        scores.append(top_scores.cpu())
        flat.append((video * num_units + indices.flatten(1).gather(1, candidate)).cpu())
    flat_index = torch.cat(flat)
    video, unit = flat_index // num_units, flat_index % num_units
    seconds = durations[video]
    return MomentPredictions(
        video=video,
        start=windows[unit, 0] * seconds,
        end=windows[unit, 1] * seconds,
        score=torch.cat(scores),
    )


def temporal_iou(start_a: Tensor, end_a: Tensor, start_b: Tensor, end_b: Tensor) -> Tensor:
    """Broadcast IoU of intervals as the official code: intersection / (max end - min start); 0 where that is 0."""
    intersection = (torch.minimum(end_a, end_b) - torch.maximum(start_a, start_b)).clamp(min=0)
    span = torch.maximum(end_a, end_b) - torch.minimum(start_a, start_b)
    return torch.where(span > 0, intersection / span.clamp(min=torch.finfo(span.dtype).tiny), 0.0)


def moment_hits(
    predictions: MomentPredictions, gt_video: Tensor, gt_windows: Sequence[Tensor], threshold: float, max_scored: int
) -> Tensor:
    """[Nq, min(P, max_scored)] bool: the prediction is in the right video and matches enough ground-truth windows.

    Args:
        predictions: ranked predictions of Nq queries.
        gt_video: [Nq] index of each query's ground-truth video.
        gt_windows: per query, an [n, 2] tensor of ground-truth [start, end] in seconds, n >= 1.
        threshold: IoU a window must reach.
        max_scored: leading predictions considered.
    """
    windows = pad_sequence([w.to(torch.float64).reshape(-1, 2) for w in gt_windows], batch_first=True)
    counts = torch.tensor([w.numel() // 2 for w in gt_windows])
    valid = torch.arange(windows.shape[1]).unsqueeze(0) < counts.unsqueeze(1)  # [Nq, M]
    start = predictions.start[:, :max_scored].to(torch.float64).unsqueeze(2)  # [Nq, P, 1]
    end = predictions.end[:, :max_scored].to(torch.float64).unsqueeze(2)
    iou = temporal_iou(start, end, windows[:, None, :, 0], windows[:, None, :, 1])  # [Nq, P, M]
    matched = ((iou >= threshold) & valid.unsqueeze(1)).sum(dim=2)
    needed = (counts // 2).clamp(min=1).unsqueeze(1)  # one window: itself; n >= 2: floor(n / 2) of them
    right_video = predictions.video[:, :max_scored] == gt_video.reshape(-1, 1)
    return right_video & (matched >= needed)


def moment_recalls(
    predictions: MomentPredictions, gt_video: Tensor, gt_windows: Sequence[Tensor], config: MomentConfig
) -> dict[str, float]:
    """Recall (percent of queries) with a hit among the first k predictions, keyed "<iou>-r<k>"."""
    num_queries = predictions.video.shape[0]
    if num_queries == 0:
        raise PipelineError("cannot compute moment recalls of zero queries")
    hits = moment_hit_counts(predictions, gt_video, gt_windows, config)
    return {key: 100.0 * count / num_queries for key, count in hits.items()}


def moment_hit_counts(
    predictions: MomentPredictions, gt_video: Tensor, gt_windows: Sequence[Tensor], config: MomentConfig
) -> dict[str, int]:
    """Queries with a hit among the first k predictions, keyed "<iou>-r<k>" (summed over chunks of queries, these
    give the recalls of all of them without holding every query's predictions at once)."""
    num_queries = predictions.video.shape[0]
    if len(gt_windows) != num_queries or gt_video.numel() != num_queries:
        raise PipelineError(
            f"{num_queries} queries with predictions but {gt_video.numel()} ground-truth videos and "
            f"{len(gt_windows)} ground-truth window lists"
        )
    empty = [i for i, w in enumerate(gt_windows) if w.numel() == 0]
    if empty:
        raise PipelineError(f"query #{empty[0]} (and {len(empty) - 1} more) has no ground-truth moment to score")
    counts = {}
    for threshold in config.iou_thresholds:
        hits = moment_hits(predictions, gt_video, gt_windows, threshold, config.max_scored)
        for k in config.recall_ks:
            counts[f"{threshold}-r{k}"] = int(hits[:, :k].any(dim=1).sum())
    return counts


def _check_inputs(units: Tensor, unit_windows: Tensor, durations: Tensor) -> tuple[Tensor, Tensor]:
    """Unit windows [K, 2] and durations [Nv] as float32 CPU tensors, checked against the units."""
    windows = torch.as_tensor(unit_windows, dtype=torch.float32).cpu()
    durations = torch.as_tensor(durations, dtype=torch.float32).cpu().reshape(-1)
    if units.ndim != 3:
        raise PipelineError(f"video units must be [videos, units, dim], got shape {tuple(units.shape)}")
    if windows.shape != (units.shape[1], 2):
        raise PipelineError(f"unit windows must be [{units.shape[1]}, 2] (one per unit), got {tuple(windows.shape)}")
    if bool((windows < 0).any() | (windows > 1).any() | (windows[:, 0] >= windows[:, 1]).any()):
        raise PipelineError("unit windows must be normalised [start, end] with 0 <= start < end <= 1")
    if durations.shape[0] != units.shape[0]:
        raise PipelineError(f"{durations.shape[0]} durations for {units.shape[0]} videos")
    if bool((durations <= 0).any()):
        raise PipelineError(f"video #{int((durations <= 0).nonzero()[0])} has a non-positive duration")
    return windows, durations
