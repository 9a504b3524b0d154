"""PRVR metrics: one function for every model (R@1/5/10/100, SumR, MedR, MeanR) with a stable tie rule.

The rank of the ground-truth video of query i among the scores S[i] (higher is better) is

    rank_i = 1 + #{j : S[i, j] > g_i} + #{j < gt_i : S[i, j] = g_i},   g_i = S[i, gt_i],

which equals the 1-based position of gt_i in a *stable* descending sort of S[i]. The official codes use unstable
sorts, so they agree with this rule exactly when a row has no ties (docs/baselines_official_code.md §2.2-2.3).

Every metric comes with a 95 % percentile-bootstrap interval over queries (`ci`: 1000 resamples of the queries with
replacement, fixed seed, vectorised). Two models evaluated on the same queries are compared by a *paired* bootstrap
(`paired_bootstrap`): both are scored on the same resampled queries, so what they share cancels out. The per-query
ranks that pairing needs are kept in every metrics file. From those ranks alone, `recall_at_corpus_sizes` gives the
exact expected recall on a random sub-corpus of any smaller size (a hypergeometric count of the videos ahead).

Score a saved similarity matrix from the command line:

    python pipeline.py score-matrix --sims SIMS.npy --gt GT.npy
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stages.data.errors import PipelineError

RECALL_KS = (1, 5, 10, 100)
PRVR_KEYS = ("R1", "R5", "R10", "R100", "SumR", "MedR", "MeanR")
_RESAMPLE_ELEMENTS = 1 << 24  # resampled query indices held at once (128 MiB of int64)


@dataclass(frozen=True)
class BootstrapConfig:
    """The percentile bootstrap over queries behind every interval."""

    resamples: int = 1000  # resamples of the queries (with replacement); 0 = no intervals
    level: float = 0.95  # coverage of the two-sided interval
    seed: int = 0  # fixed: the same queries give the same interval, and two models the same resamples

    def __post_init__(self) -> None:
        if self.resamples < 0 or not 0 < self.level < 1:
            raise PipelineError(f"bootstrap: resamples must be >= 0 and level in (0, 1), got {self}")


NO_INTERVALS = BootstrapConfig(resamples=0)  # for model selection, which reads the point values only


def count_ranked_ahead(scores: Tensor, gt_scores: Tensor, gt: Tensor, column_offset: int = 0) -> Tensor:
    """Per query, the videos of a block of columns ranked ahead of its ground truth under the stable tie rule.

    Args:
        scores: [Nq, Nv_block] scores of columns `column_offset ..` of the full matrix.
        gt_scores: [Nq] score of each query's ground-truth video.
        gt: [Nq] ground-truth column of each query in the full matrix.
        column_offset: full-matrix index of the block's first column.

    Returns:
        [Nq] int64 counts; summed over the blocks of a row partition and plus one, they give the rank.
    """
    gt_scores = gt_scores.unsqueeze(1)
    columns = torch.arange(column_offset, column_offset + scores.shape[1], device=scores.device)
    ahead = (scores > gt_scores) | ((scores == gt_scores) & (columns.unsqueeze(0) < gt.unsqueeze(1)))
    return ahead.sum(dim=1)


def gt_ranks(sims: Tensor, gt: Tensor) -> Tensor:
    """1-based rank of each query's ground-truth video (stable tie rule), vectorised on the scores' device.

    Args:
        sims: [Nq, Nv] scores, higher is better.
        gt: [Nq] integer column of each query's ground-truth video.

    Returns:
        [Nq] int64 ranks in 1..Nv.
    """
    gt = gt.to(device=sims.device, dtype=torch.long)
    gt_scores = sims.gather(1, gt.unsqueeze(1)).squeeze(1)
    return count_ranked_ahead(sims, gt_scores, gt) + 1


def prvr_metrics_from_ranks(
    ranks: Tensor | np.ndarray, bootstrap: BootstrapConfig | None = BootstrapConfig()
) -> dict[str, Any]:
    """R1, R5, R10, R100 (percent of queries), SumR (sum of the unrounded recalls), MedR and MeanR, and under `ci`
    each one's bootstrap interval [low, high] (none when `bootstrap` is None or has no resamples).

    MedR is the usual median (the mean of the two middle ranks for an even number of queries).
    """
    ranks = _checked_ranks(ranks)
    metrics: dict[str, Any] = dict(zip(PRVR_KEYS, (float(v) for v in _statistics(ranks[None])[:, 0]), strict=True))
    if bootstrap is not None and bootstrap.resamples:
        metrics["ci"] = bootstrap_intervals(ranks, bootstrap)
    return metrics


def bootstrap_intervals(ranks: np.ndarray, config: BootstrapConfig) -> dict[str, list[float]]:
    """Percentile-bootstrap interval [low, high] of every PRVR metric over the queries of `ranks`."""
    stats = np.concatenate([_statistics(ranks[block]) for block in _resampled_indices(ranks.size, config)], axis=1)
    tail = 50.0 * (1.0 - config.level)
    low, high = np.percentile(stats, [tail, 100.0 - tail], axis=1)
    return {key: [float(lo), float(hi)] for key, lo, hi in zip(PRVR_KEYS, low, high, strict=True)}


def paired_bootstrap(ranks_a: np.ndarray, ranks_b: np.ndarray, config: BootstrapConfig) -> dict[str, Any]:
    """SumR of model A minus SumR of model B on the same queries, with its paired bootstrap interval.

    Both models are scored on the same resampled queries, so the interval reflects only how they differ.

    Returns:
        {"delta_SumR", "ci": [low, high], "excludes_zero": whether the interval lies strictly on one side of 0}.
    """
    ranks_a, ranks_b = _checked_ranks(ranks_a), _checked_ranks(ranks_b)
    if ranks_a.shape != ranks_b.shape:
        raise PipelineError(f"paired comparison needs the same queries: {ranks_a.size} ranks against {ranks_b.size}")
    if not config.resamples:
        raise PipelineError("paired comparison needs bootstrap resamples > 0")
    difference = _sum_recall_per_query(ranks_a) - _sum_recall_per_query(ranks_b)
    means = np.concatenate([difference[block].mean(axis=1) for block in _resampled_indices(difference.size, config)])
    tail = 50.0 * (1.0 - config.level)
    low, high = (float(v) for v in np.percentile(means, [tail, 100.0 - tail]))
    return {"delta_SumR": float(difference.mean()), "ci": [low, high], "excludes_zero": bool(low > 0 or high < 0)}


def recall_at_corpus_sizes(
    ranks: np.ndarray, num_videos: int, sizes: list[int] | tuple[int, ...], ks: tuple[int, ...] = RECALL_KS
) -> dict[str, list[float]]:
    """Expected R@k (percent) on a random sub-corpus of each size that keeps every query's ground-truth video.

    A query with rank r has r - 1 of the other `num_videos` - 1 videos ahead of it; in a sub-corpus of n videos the
    number of those kept is hypergeometric, so P(rank <= k) is exact, with no sampling. At n = `num_videos` this is
    the ordinary R@k.

    Returns:
        {"size": sizes, "R<k>": expected recall at each size, ...}.
    """
    ranks = _checked_ranks(ranks).astype(np.int64)
    if int(ranks.max()) > num_videos or any(not 1 <= n <= num_videos for n in sizes):
        raise PipelineError(f"corpus sizes must lie in 1..{num_videos} and ranks must not exceed it")
    others = num_videos - 1
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, others + 1)))])

    def log_choose(n: np.ndarray, k: np.ndarray) -> np.ndarray:
        inside = np.clip(k, 0, n)
        value = log_factorial[n] - log_factorial[inside] - log_factorial[n - inside]
        return np.where((k >= 0) & (k <= n), value, -np.inf)

    ahead = (ranks - 1)[:, None]
    curves: dict[str, list[float]] = {"size": [int(n) for n in sizes]}
    for k in ks:
        kept = np.arange(k)[None, :]  # a hit keeps at most k - 1 of the videos ahead
        values = []
        for n in sizes:
            draws = n - 1
            log_p = (
                log_choose(ahead, kept)
                + log_choose(others - ahead, draws - kept)
                - log_choose(np.array(others), np.array(draws))
            )
            values.append(100.0 * float(np.exp(log_p).sum(axis=1).clip(0.0, 1.0).mean()))
        curves[f"R{k}"] = values
    return curves


def ground_truth_digest(gt: Tensor | np.ndarray, num_videos: int) -> str:
    """sha256 of the ground-truth columns and the corpus size: equal digests mean the same queries, so the
    per-query ranks of two evaluations can be paired."""
    columns = np.ascontiguousarray(np.asarray(gt, dtype=np.int64).reshape(-1))
    return hashlib.sha256(columns.tobytes() + str(num_videos).encode()).hexdigest()


def _checked_ranks(ranks: Tensor | np.ndarray) -> np.ndarray:
    ranks = torch.as_tensor(ranks).reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    if ranks.size == 0:
        raise PipelineError("cannot compute PRVR metrics of zero queries")
    if bool((ranks < 1).any()):
        raise PipelineError(f"ranks must be >= 1 (1-based); got a minimum of {ranks.min():g}")
    return ranks


def _sum_recall_per_query(ranks: np.ndarray) -> np.ndarray:
    """Each query's share of SumR: 100 x the number of k in RECALL_KS with rank <= k (SumR is its mean)."""
    return 100.0 * sum((ranks <= k).astype(np.float64) for k in RECALL_KS)


def _statistics(ranks: np.ndarray) -> np.ndarray:
    """[7, b] PRVR_KEYS of each row of [b, n] ranks."""
    recalls = [100.0 * (ranks <= k).mean(axis=1) for k in RECALL_KS]
    return np.stack([*recalls, sum(recalls), np.median(ranks, axis=1), ranks.mean(axis=1)])


def _resampled_indices(num_queries: int, config: BootstrapConfig) -> Iterator[np.ndarray]:
    """The bootstrap's resampled query indices, streamed in [b, n] blocks (the same for any two calls with equal n)."""
    generator = np.random.default_rng(config.seed)
    per_block = max(1, _RESAMPLE_ELEMENTS // num_queries)
    for start in range(0, config.resamples, per_block):
        yield generator.integers(0, num_queries, size=(min(per_block, config.resamples - start), num_queries))


def prvr_metrics(sims: Tensor, gt: Tensor) -> dict[str, Any]:
    """PRVR metrics of a full [Nq, Nv] score matrix with one ground-truth column per query."""
    return prvr_metrics_from_ranks(gt_ranks(sims, gt))


def load_score_matrix(sims_path: str | Path, gt_path: str | Path) -> tuple[Tensor, Tensor]:
    """Read and check a saved score matrix SIMS [queries, videos] (float) and GT [queries] (int) from .npy files."""
    sims = _load_npy(sims_path, "SIMS")
    gt = _load_npy(gt_path, "GT")
    if sims.ndim != 2 or 0 in sims.shape:
        raise PipelineError(f"{sims_path}: SIMS must be a non-empty [queries, videos] array, got shape {sims.shape}")
    if not np.issubdtype(sims.dtype, np.floating):
        raise PipelineError(f"{sims_path}: SIMS must hold floats, got dtype {sims.dtype}")
    if not np.isfinite(sims).all():
        bad = np.argwhere(~np.isfinite(sims))[0]
        raise PipelineError(f"{sims_path}: SIMS has a non-finite value at [{bad[0]}, {bad[1]}]; fix the scores")
    if gt.ndim != 1:
        raise PipelineError(f"{gt_path}: GT must be a 1-D [queries] array, got shape {gt.shape}")
    if not np.issubdtype(gt.dtype, np.integer):
        raise PipelineError(f"{gt_path}: GT must hold integer video columns, got dtype {gt.dtype}")
    if gt.shape[0] != sims.shape[0]:
        raise PipelineError(
            f"{gt_path}: GT has {gt.shape[0]} entries but SIMS ({sims_path}) has {sims.shape[0]} query rows"
        )
    out_of_range = np.flatnonzero((gt < 0) | (gt >= sims.shape[1]))
    if out_of_range.size:
        first = out_of_range[0]
        raise PipelineError(
            f"{gt_path}: GT[{first}] = {gt[first]} is not a video column of SIMS (0..{sims.shape[1] - 1}); "
            f"{out_of_range.size} entries are out of range"
        )
    return torch.from_numpy(sims), torch.from_numpy(gt.astype(np.int64))


def score_matrix_files(sims_path: str | Path, gt_path: str | Path) -> dict[str, Any]:
    """PRVR metrics of a saved score matrix with their bootstrap intervals (the `score-matrix` command)."""
    return prvr_metrics(*load_score_matrix(sims_path, gt_path))


def _load_npy(path: str | Path, name: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{name} file {path} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PipelineError(f"{path}: cannot read {name} as a .npy array ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise PipelineError(f"{path}: {name} must be a single .npy array, not an .npz archive")
    return array
