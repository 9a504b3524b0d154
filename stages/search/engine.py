"""Ranking a store's videos for queries with the model's own similarity: exact (chunked) or approximate then exact.

The score of a video is what evaluation computes for it:
- models scored on their units (ProPy, frozen-CLIP MIL; no `score_fn`): the max over the video's units of
  `q . u`, the query L2-normalised and the units stored L2-normalised (a cosine), or raw when the model scores raw
  units (ProPy's `normalize_eval: false`);
- models with their own score (the MS-SL family): `score_fn(queries, packed videos)` through the evaluator's
  chunked scorer (`stages.evaluate.retrieval.iter_score_blocks`).
Ties are broken as in evaluation's stable rule: the earlier video (store order) first. A result's moment is the
video's best unit: the arg-max unit of the score, or for models with their own score the unit most similar (cosine)
to the query.

Exact search over units scans the fp16 matrix chunk by chunk. With few queries it multiplies in fp16 (fp32
accumulation, fp16 result; converting fp16 to fp32 costs more than the product on this project's CPUs), keeps every
video whose fp16 score is within the rounding bound of the k-th best, and scores those in fp32: the same top k as a
pure fp32 scan. Above `AnnConfig.min_units` units the approximate index proposes candidate videos instead, and
those go through the same two steps.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stages.evaluate.retrieval import ScoreFn, ScoringConfig, iter_score_blocks
from stages.search.ann import AnnIndex
from stages.search.store import UnitStore

HALF_ERROR = 2.0**-8  # bound on |fp16 kernel - fp32| per unit of |q| |u| (query and result rounding: 2 x 2^-11)


@dataclass(frozen=True)
class EngineConfig:
    """How queries are scored."""

    chunk_units: int = 131072  # units scored per step of the exact scan
    half_queries: int = 4  # scans of at most this many queries use the fp16 kernel; more convert chunks to fp32
    memory_budget_mb: float = 512.0  # working memory of the [queries, videos] score blocks


@dataclass(frozen=True)
class Match:
    """One ranked video."""

    video: int  # index in the store
    score: float  # the model's similarity
    unit: int  # the store's index of the video's best unit (its moment and thumbnail)


class SearchEngine:
    """Top-k videos of query embeddings over a `UnitStore`.

    Args:
        store: the opened store.
        score_fn: the model's own similarity over packed videos, or None to score the max over units.
        config: scan sizes and memory budget of exact scoring.
        ann: the approximate index, used when there is one, the searched videos have at least its
            `min_units` units, and `exact` is not asked.
    """

    def __init__(
        self, store: UnitStore, score_fn: ScoreFn | None, config: EngineConfig, ann: AnnIndex | None = None
    ) -> None:
        if score_fn is not None and store.packed is None:
            raise ValueError("a model with its own score needs the store's packed tensors")
        self.store, self.score_fn, self.config, self.ann = store, score_fn, config, ann

    def search(
        self,
        queries: Tensor,
        k: int,
        videos: np.ndarray | None = None,
        min_score: float | None = None,
        exact: bool = False,
    ) -> list[list[Match]]:
        """The k best videos of each query [Q, D], best first.

        Args:
            queries: query embeddings.
            k: videos per query.
            videos: restrict to these store indices (sorted); None = every video.
            min_score: leave out videos scoring below this.
            exact: never use the approximate index.
        """
        if self.store.num_videos == 0 or (videos is not None and not len(videos)):
            return [[] for _ in range(len(queries))]
        unit_queries = F.normalize(queries.float().cpu(), dim=-1)
        if not exact and self._use_ann(videos):
            allowed = None if videos is None else np.isin(np.arange(self.store.num_videos), videos)
            candidates = self.ann.candidates(unit_queries.numpy(), self.store.video_of_units)
            return [
                self._rank(query[None], found if allowed is None else found[allowed[found]], k, min_score)[0]
                for query, found in zip(queries, candidates, strict=True)
            ]
        selected = np.arange(self.store.num_videos) if videos is None else np.asarray(videos)
        if self.score_fn is not None:
            return self._rank(queries, selected, k, min_score)
        return self._exact_units(unit_queries, selected, k, min_score, contiguous=videos is None)

    def _use_ann(self, videos: np.ndarray | None) -> bool:
        if self.ann is None:
            return False
        units = self.store.num_units if videos is None else int(self.store.lengths(videos).sum())
        return units >= self.ann.config.min_units

    # ---- models scored on their units -------------------------------------------------------------------------

    def _exact_units(
        self, queries: Tensor, selected: np.ndarray, k: int, min_score: float | None, contiguous: bool = False
    ) -> list[list[Match]]:
        """Scan the selected videos' units (L2-normalised queries), then score in fp32 the videos the fp16 scan
        cannot rule out. `contiguous`: `selected` is every video of the store, in order (no gathering)."""
        if not len(selected):
            return [[] for _ in range(len(queries))]
        half = len(queries) <= self.config.half_queries
        margin = HALF_ERROR * max(1.0, float(self.store.meta.get("max_norm", 1.0))) if half else 0.0
        results = []
        for start, approx in self._scan(queries, selected, contiguous, half):
            for row, query in zip(approx, queries[start : start + len(approx)], strict=True):
                kth = np.partition(row, len(row) - min(k, len(row)))[len(row) - min(k, len(row))]
                survivors = selected[row >= max(kth, -np.inf if min_score is None else min_score) - margin]
                scores, best = self._best_units(query, survivors)
                results.append(_ranked(survivors, scores, best, k, min_score))
        return results

    def _scan(
        self, queries: Tensor, selected: np.ndarray, contiguous: bool, half: bool
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(first query, [q, len(selected)] max unit scores) per block of queries (fp16 kernel when `half`)."""
        offsets = self.store.offsets
        lengths = self.store.lengths(selected)
        budget = max(1, int(self.config.memory_budget_mb * 2**20 // (4 * len(selected))))
        bounds = _chunk_bounds(lengths, self.config.chunk_units)
        for start in range(0, len(queries), budget):
            block = queries[start : start + budget]
            weights = block.half() if half else block
            approx = np.empty((len(block), len(selected)), np.float32)
            for first, last in bounds:
                if contiguous:
                    units = self.store.units[offsets[selected[first]] : offsets[selected[last - 1] + 1]]
                else:
                    units = self.store.read_units(selected[first:last])
                scores = _as_tensor(units)
                if half:  # one matrix-vector product per query: fp16 in, fp32 accumulation, fp16 out
                    scores = torch.stack([scores @ query for query in weights], dim=1)
                else:
                    scores = scores.float() @ weights.T
                starts = np.concatenate([[0], np.cumsum(lengths[first : last - 1])])
                approx[:, first:last] = np.maximum.reduceat(scores.float().numpy(), starts, axis=0).T
            yield start, approx

    def _best_units(self, query: Tensor, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per video, the max over its units of `query . u` (fp32) and that unit's store index."""
        if not len(videos):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        lengths = self.store.lengths(videos)
        scores = self.store.read_units(videos).astype(np.float32) @ query.numpy()
        owner = np.repeat(np.arange(len(videos)), lengths)
        order = np.lexsort((-scores, owner))  # by video, best unit first (the earlier unit on ties)
        first = order[np.concatenate([[0], np.cumsum(lengths)[:-1]])]
        return scores[first], self.store.unit_indices(videos)[first]

    # ---- models with their own score ----------------------------------------------------------------------------

    def _rank(self, queries: Tensor, videos: np.ndarray, k: int, min_score: float | None) -> list[list[Match]]:
        """Rank `videos` exactly for each query: the model's own score, or the max over units."""
        if self.score_fn is None:
            return self._exact_units(F.normalize(queries.float(), dim=-1), videos, k, min_score)
        if not len(videos):
            return [[] for _ in range(len(queries))]
        packed = self.store.packed
        everything = len(videos) == self.store.num_videos
        tensor = _as_tensor(packed if everything else packed[videos])
        scoring = ScoringConfig(memory_budget_mb=self.config.memory_budget_mb, device="cpu")
        results = []
        for rows, scores, _ in iter_score_blocks(queries, tensor, scoring, _upcast(self.score_fn), progress=False):
            for row, query in zip(scores.numpy(), queries[rows], strict=True):
                top = _ranked(videos, row, np.zeros(len(videos), np.int64), k, min_score)
                chosen = np.array([match.video for match in top], dtype=np.int64)
                _, best = self._best_units(F.normalize(query.float(), dim=-1), chosen)
                results.append([dataclasses.replace(m, unit=int(u)) for m, u in zip(top, best, strict=True)])
        return results


def _ranked(videos: np.ndarray, scores: np.ndarray, units: np.ndarray, k: int, min_score: float | None) -> list[Match]:
    """The k best (score descending, then video ascending), at least `min_score`."""
    keep = np.ones(len(videos), bool) if min_score is None else scores >= min_score
    videos, scores, units = videos[keep], scores[keep], units[keep]
    order = np.lexsort((videos, -scores))[:k]
    return [Match(int(videos[i]), float(scores[i]), int(units[i])) for i in order]


def _chunk_bounds(lengths: np.ndarray, chunk_units: int) -> list[tuple[int, int]]:
    """Consecutive [first, last) video ranges of about `chunk_units` units each (at least one video)."""
    ends = np.cumsum(lengths)
    bounds, first = [], 0
    while first < len(lengths):
        last = max(first + 1, int(np.searchsorted(ends, ends[first] - lengths[first] + chunk_units, side="right")))
        bounds.append((first, last))
        first = last
    return bounds


def _as_tensor(array: np.ndarray) -> Tensor:
    """A tensor over a (read-only, memory-mapped) array without copying it; the array is never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(array))


def _upcast(score_fn: ScoreFn) -> ScoreFn:
    """`score_fn` on float32 copies of fp16 video tiles."""

    def score(queries: Tensor, videos: Tensor) -> Tensor:
        return score_fn(queries.float(), videos.float())

    return score
