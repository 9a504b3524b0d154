"""Chunked query-video scoring on any device: MIL max-over-units cosine similarity, or a model's own score function.

Videos are [Nv, K, E] tensors of K units each (events, clips or frames; K = 1 for single-vector models) and queries
are [Nq, E]. Scores are computed tile by tile (a chunk of queries against a chunk of videos), the tile sizes being
chosen from a memory budget, and assembled into one [q, Nv] row block per chunk of queries. A row block is enough to
rank the ground truth, so a 100k-video corpus is evaluated without ever holding the full [Nq, Nv] matrix;
`similarity_matrix` assembles the full matrix when it is wanted and fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.data.device import resolve_device
from stages.data.errors import PipelineError
from stages.data.progress import progress_bar
from stages.evaluate.metrics import gt_ranks

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""A model's own similarity: (queries [q, ...], videos [v, ...]) -> scores [q, v], higher is better."""
TileFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]

_FLOAT32_BYTES = 4
_ROW_BYTES_PER_SCORE = 16  # float score + int64 best unit + comparison temporaries, per (query, video) of a row block


@dataclass(frozen=True)
class ScoringConfig:
    """How query-video scores are computed."""

    memory_budget_mb: float = 512.0  # working memory of one row block plus one tile, on the scoring device
    normalize_units: bool = True  # False: raw unit norms (ProPy's faithful ActivityNet PRVR evaluation defect)
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...


def max_unit_similarity(queries: Tensor, units: Tensor, normalize_units: bool = True) -> tuple[Tensor, Tensor]:
    """Cosine similarity of each query to each video's best unit (MIL max) and that unit's index.

    Args:
        queries: [q, E] query embeddings (L2-normalised here).
        units: [v, K, E] video units.
        normalize_units: L2-normalise the units; False keeps their raw norms.

    Returns:
        scores [q, v] (float32) and best unit [q, v] (int64).
    """
    return unit_similarities(queries, units, normalize_units).max(dim=-1)


def unit_similarities(queries: Tensor, units: Tensor, normalize_units: bool = True) -> Tensor:
    """[q, v, K] similarity of every query to every unit of every video (float32, one matmul)."""
    num_videos, num_units, dim = units.shape
    queries = F.normalize(queries.float(), dim=-1)
    units = units.float()
    if normalize_units:
        units = F.normalize(units, dim=-1)
    return (queries @ units.reshape(-1, dim).T).view(queries.shape[0], num_videos, num_units)


def plan_chunks(
    num_queries: int, num_videos: int, video_shape: tuple[int, ...], budget_mb: float, width: int = 1
) -> tuple[int, int]:
    """Queries per row block and videos per tile that keep one row block plus one tile within `budget_mb`.

    Half of the budget goes to the [q, Nv, width] row block, half to a tile: the [q, v, K] unit scores and a float32
    copy of the v videos.
    """
    budget = budget_mb * 2**20 / 2
    units = video_shape[0] if video_shape else 1
    per_video = _FLOAT32_BYTES * max(1, math.prod(video_shape))
    query_chunk = int(min(num_queries, max(1, budget // (num_videos * width * _ROW_BYTES_PER_SCORE))))
    video_chunk = int(min(num_videos, max(1, budget // (_FLOAT32_BYTES * units * query_chunk + 2 * per_video))))
    return query_chunk, video_chunk


def iter_tile_blocks(
    queries: Tensor,
    videos: Tensor,
    tile_fn: TileFn,
    config: ScoringConfig,
    width: int = 1,
    with_indices: bool = False,
    progress: bool = True,
) -> Iterator[tuple[slice, Tensor, Tensor | None]]:
    """Run `tile_fn` over tiles of queries x videos and yield one assembled row block per chunk of queries.

    Args:
        queries: [Nq, ...] query embeddings, on any device.
        videos: [Nv, ...] video embeddings, on any device.
        tile_fn: (queries [q, ...], videos [v, ...]) on the scoring device -> values [q, v, width] and,
            if `with_indices`, int64 indices [q, v, width].
        config: device and memory budget.
        width: values kept per (query, video) pair.
        with_indices: assemble the indices too.
        progress: show a progress bar over the row blocks.

    Yields:
        (query rows, values [q, Nv, width], indices [q, Nv, width] or None), on the scoring device.
    """
    if queries.shape[0] == 0 or videos.shape[0] == 0:
        raise PipelineError(f"nothing to score: {queries.shape[0]} queries against {videos.shape[0]} videos")
    device = resolve_device(config.device)
    num_queries, num_videos = queries.shape[0], videos.shape[0]
    query_chunk, video_chunk = plan_chunks(
        num_queries, num_videos, tuple(videos.shape[1:]), config.memory_budget_mb, width
    )
    starts = range(0, num_queries, query_chunk)
    for start in progress_bar(
        starts, desc="scoring", unit="block", leave=False, disable=not progress or len(starts) < 2
    ):
        rows = slice(start, min(start + query_chunk, num_queries))
        query_block = queries[rows].to(device)
        values = torch.empty(query_block.shape[0], num_videos, width, device=device)
        indices = torch.empty(values.shape, dtype=torch.long, device=device) if with_indices else None
        for first in range(0, num_videos, video_chunk):
            columns = slice(first, min(first + video_chunk, num_videos))
            tile_values, tile_indices = tile_fn(query_block, videos[columns].to(device))
            values[:, columns] = tile_values
            if indices is not None:
                indices[:, columns] = tile_indices
        yield rows, values, indices


def iter_score_blocks(
    queries: Tensor,
    videos: Tensor,
    config: ScoringConfig,
    score_fn: ScoreFn | None = None,
    with_best_unit: bool = False,
    progress: bool = True,
) -> Iterator[tuple[slice, Tensor, Tensor | None]]:
    """Yield (query rows, scores [q, Nv], best unit [q, Nv] or None) for consecutive chunks of queries.

    Args:
        queries: [Nq, E] query embeddings, on any device.
        videos: [Nv, K, E] video units (or, with `score_fn`, whatever [Nv, ...] tensor the function takes).
        config: device, memory budget and unit normalisation.
        score_fn: the model's own similarity instead of the max-over-units cosine.
        with_best_unit: also return the index of each video's best unit (max-over-units cosine only).
        progress: show a progress bar over the row blocks.
    """
    _check_shapes(queries, videos, score_fn)
    if with_best_unit and score_fn is not None:
        raise PipelineError("the best unit index exists only for the max-over-units cosine, not for a score_fn")

    def tile_fn(query_block: Tensor, video_block: Tensor) -> tuple[Tensor, Tensor | None]:
        if score_fn is not None:
            return score_fn(query_block, video_block).unsqueeze(-1), None
        scores, best = max_unit_similarity(query_block, video_block, config.normalize_units)
        return scores.unsqueeze(-1), best.unsqueeze(-1)

    blocks = iter_tile_blocks(queries, videos, tile_fn, config, with_indices=with_best_unit, progress=progress)
    for rows, scores, best in blocks:
        yield rows, scores.squeeze(-1), None if best is None else best.squeeze(-1)


def similarity_matrix(
    queries: Tensor,
    videos: Tensor,
    config: ScoringConfig,
    score_fn: ScoreFn | None = None,
    with_best_unit: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The full [Nq, Nv] score matrix on the CPU (and the [Nq, Nv] best unit indices if asked)."""
    num_queries, num_videos = queries.shape[0], videos.shape[0]
    scores = torch.empty(num_queries, num_videos)
    best = torch.empty(num_queries, num_videos, dtype=torch.long) if with_best_unit else None
    for rows, block_scores, block_best in iter_score_blocks(queries, videos, config, score_fn, with_best_unit):
        scores[rows] = block_scores.cpu()
        if best is not None and block_best is not None:
            best[rows] = block_best.cpu()
    return scores, best


def rank_ground_truth(
    queries: Tensor, videos: Tensor, gt: Tensor, config: ScoringConfig, score_fn: ScoreFn | None = None
) -> Tensor:
    """[Nq] 1-based rank of each query's ground-truth video (stable tie rule), one row block at a time, on the CPU."""
    gt = torch.as_tensor(gt, dtype=torch.long).reshape(-1)
    if gt.shape[0] != queries.shape[0]:
        raise PipelineError(f"{gt.shape[0]} ground-truth indices for {queries.shape[0]} queries")
    if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= videos.shape[0]):
        raise PipelineError(f"ground-truth video indices must lie in 0..{videos.shape[0] - 1}")
    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for rows, scores, _ in iter_score_blocks(queries, videos, config, score_fn):
        ranks[rows] = gt_ranks(scores, gt[rows]).cpu()
    return ranks


def top_videos(
    queries: Tensor,
    videos: Tensor,
    k: int,
    config: ScoringConfig,
    score_fn: ScoreFn | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """The k best videos of each query: scores [Nq, k] and video indices [Nq, k], best first, on the scoring device."""
    k = min(k, videos.shape[0])
    top_scores, top_indices = [], []
    for _, scores, _ in iter_score_blocks(queries, videos, config, score_fn, progress=progress):
        values, indices = scores.topk(k, dim=1)
        top_scores.append(values)
        top_indices.append(indices)
    return torch.cat(top_scores), torch.cat(top_indices)


def _check_shapes(queries: Tensor, videos: Tensor, score_fn: ScoreFn | None) -> None:
    if queries.ndim != 2:
        raise PipelineError(f"query embeddings must be [queries, dim], got shape {tuple(queries.shape)}")
    if score_fn is not None:
        return
    if videos.ndim != 3:
        raise PipelineError(f"video embeddings must be [videos, units, dim], got shape {tuple(videos.shape)}")
    if videos.shape[2] != queries.shape[1]:
        raise PipelineError(
            f"query dim {queries.shape[1]} differs from video unit dim {videos.shape[2]} "
            f"(queries {tuple(queries.shape)}, videos {tuple(videos.shape)})"
        )
