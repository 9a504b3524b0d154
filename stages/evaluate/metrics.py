"""PRVR metrics: one function for every model (R@1/5/10/100, SumR, MedR, MeanR) with a stable tie rule.

The rank of the ground-truth video of query i among the scores S[i] (higher is better) is

    rank_i = 1 + #{j : S[i, j] > g_i} + #{j < gt_i : S[i, j] = g_i},   g_i = S[i, gt_i],

which equals the 1-based position of gt_i in a *stable* descending sort of S[i]. The official codes use unstable
sorts, so they agree with this rule exactly when a row has no ties (docs/baselines_official_code.md §2.2-2.3).

Score a saved similarity matrix from the command line:

    python pipeline.py score-matrix --sims SIMS.npy --gt GT.npy
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stages.data.errors import PipelineError

RECALL_KS = (1, 5, 10, 100)


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


def prvr_metrics_from_ranks(ranks: Tensor | np.ndarray) -> dict[str, float]:
    """R1, R5, R10, R100 (percent of queries), SumR (sum of the unrounded recalls), MedR and MeanR.

    MedR is the usual median (the mean of the two middle ranks for an even number of queries).
    """
    ranks = torch.as_tensor(ranks).reshape(-1).to(device="cpu", dtype=torch.float64)
    if ranks.numel() == 0:
        raise PipelineError("cannot compute PRVR metrics of zero queries")
    if bool((ranks < 1).any()):
        raise PipelineError(f"ranks must be >= 1 (1-based); got a minimum of {ranks.min().item():g}")
    count = ranks.numel()
    metrics = {f"R{k}": 100.0 * int((ranks <= k).sum()) / count for k in RECALL_KS}
    metrics["SumR"] = sum(metrics[f"R{k}"] for k in RECALL_KS)
    metrics["MedR"] = float(ranks.quantile(0.5))
    metrics["MeanR"] = float(ranks.sum()) / count
    return metrics


def prvr_metrics(sims: Tensor, gt: Tensor) -> dict[str, float]:
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


def score_matrix_files(sims_path: str | Path, gt_path: str | Path) -> dict[str, float]:
    """PRVR metrics of a saved score matrix (the `score-matrix` command)."""
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
