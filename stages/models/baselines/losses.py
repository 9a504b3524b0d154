"""Training losses of the MS-SL code family: multi-positive and diagonal InfoNCE, triplets, query-diverse loss.

Notation: `scores` [B_q, B_v] (query rows, video columns), `labels` [B_q] = the batch index of each query's video.

Triplet negatives are chosen by **rank** in a descending sort of the candidates' scores (rank 0 = hardest), as the
official code does; ranks are drawn by `draw_ranks` according to a `NegativeSampling`, or injected (reference checks).

| setting | query -> video, frame row/column | video -> query |
|---|---|---|
| hard negatives off | rank uniform over all candidates | rank uniform over all candidates |
| hard negatives on, pool P | rank uniform over the top min(P, B) | always rank 0 |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NegativeSampling:
    """How triplet negatives are drawn."""

    hard: bool = False  # sample from the hardest candidates (the official switch at `hard_negative_start_epoch`)
    pool_size: int = 20  # with `hard`: ranks are uniform in 0..pool_size-1 (1 = always the hardest)


def draw_ranks(
    num_candidates: torch.Tensor, pool_size: int | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One uniform rank per anchor in `0 .. min(pool_size, B) - 1` (`pool_size` None: the whole range 0..B-1)."""
    high = num_candidates if pool_size is None else num_candidates.clamp(max=pool_size)
    uniform = torch.rand(num_candidates.shape, generator=generator, device="cpu").to(num_candidates.device)
    return (uniform * high).floor().long().clamp(min=0)


def select_negatives(scores: torch.Tensor, positive: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Column index of the negative of rank `ranks[i]` in row i (candidates: columns where `positive` is False)."""
    masked = scores.detach().masked_fill(positive, float("-inf"))
    order = torch.argsort(masked, dim=1, descending=True, stable=True)
    return order.gather(1, ranks[:, None]).squeeze(1)


def _choose(
    scores: torch.Tensor,
    positive: torch.Tensor,
    pool_size: int | None,
    generator: torch.Generator | None,
    ranks: torch.Tensor | None,
) -> torch.Tensor:
    if ranks is None:
        ranks = draw_ranks((~positive).sum(dim=1), pool_size, generator)
    return select_negatives(scores, positive, ranks.to(scores.device))


def _hinge(violations: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean hinge over the anchors; an anchor without any candidate (a one-video batch) contributes 0."""
    has_candidates = (~positive).any(dim=1)
    return (F.relu(violations) * has_candidates).mean()


def video_triplet(
    scores: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    sampling: NegativeSampling,
    generator: torch.Generator | None = None,
    ranks: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The clip-style triplet on a cosine matrix: query->video (`t2v`) and video->query (`v2t`) terms.

    t2v = mean_i relu(m + X[i, n_i] - X[i, y_i]); v2t = mean_v relu(m + X[n_v, v] - mean_{i: y_i = v} X[i, v]).

    Returns:
        ({"t2v", "v2t"}: loss terms, {"t2v": [B_q] video indices, "v2t": [B_v] query indices}: the negatives).
    """
    ranks = ranks or {}
    positive = F.one_hot(labels, scores.shape[1]).bool()  # [B_q, B_v]
    pool = sampling.pool_size if sampling.hard else None
    neg_t2v = _choose(scores, positive, pool, generator, ranks.get("t2v"))
    neg_v2t = _choose(scores.t(), positive.t(), 1 if sampling.hard else None, generator, ranks.get("v2t"))
    rows = torch.arange(len(labels), device=scores.device)
    t2v = _hinge(margin + scores[rows, neg_t2v] - scores[rows, labels], positive)
    weights = positive.to(scores.dtype)
    positive_mean = (scores * weights).sum(dim=0) / weights.sum(dim=0)
    columns = torch.arange(scores.shape[1], device=scores.device)
    v2t = _hinge(margin + scores[neg_v2t, columns] - positive_mean, positive.t())
    return {"t2v": t2v, "v2t": v2t}, {"t2v": neg_t2v, "v2t": neg_v2t}


def diagonal_triplet(
    scores: torch.Tensor,
    margin: float,
    sampling: NegativeSampling,
    generator: torch.Generator | None = None,
    ranks: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """MS-SL's frame triplet on a square matrix with positives on the diagonal (`row` and `col` terms).

    Every off-diagonal entry is a candidate, including other queries of the same video (official quirk).
    """
    ranks = ranks or {}
    positive = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    pool = sampling.pool_size if sampling.hard else None
    neg_row = _choose(scores, positive, pool, generator, ranks.get("row"))
    neg_col = _choose(scores.t(), positive, pool, generator, ranks.get("col"))
    rows = torch.arange(len(scores), device=scores.device)
    diagonal = scores.diagonal()
    row = _hinge(margin + scores[rows, neg_row] - diagonal, positive)
    col = _hinge(margin + scores[neg_col, rows] - diagonal, positive)
    return {"row": row, "col": col}, {"row": neg_row, "col": neg_col}


def multi_positive_nce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`mean_i [LSE_j X[i,j] - X[i,y_i]] + mean_v [LSE_i X[i,v] - LSE_{i: y_i = v} X[i,v]]` (official `clip_nce`)."""
    rows = torch.arange(len(labels), device=scores.device)
    t2v = (torch.logsumexp(scores, dim=1) - scores[rows, labels]).mean()
    positive = F.one_hot(labels, scores.shape[1]).bool()
    own = torch.logsumexp(scores.masked_fill(~positive, float("-inf")), dim=0)
    v2t = (torch.logsumexp(scores, dim=0) - own).mean()
    return t2v + v2t


def diagonal_nce(scores: torch.Tensor) -> torch.Tensor:
    """`mean_i [LSE(row i and column i of X) - X[i,i]]`: one softmax over 2 B terms (official `frame_nce`)."""
    both = torch.cat([scores, scores.t()], dim=1)
    return (torch.logsumexp(both, dim=1) - scores.diagonal()).mean()


def query_diverse_loss(query_vecs: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """GMMFormer's QDL: `mean_j log(1 + sum_{i != j, y_i = y_j} exp(scale * (cos(q_i, q_j) + margin)))`."""
    unit = F.normalize(query_vecs, dim=-1)
    cosine = unit @ unit.t()
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pushed = (torch.exp(scale * (cosine + margin)) * same).sum(dim=0)
    return torch.log1p(pushed).mean()


def query_diverse_loss_v2(
    query_vecs: torch.Tensor, labels: torch.Tensor, margin: float, scale: float, focal: float
) -> torch.Tensor:
    """GMMFormer v2's QDL: `(1/B_q) sum_{i != j, y_i = y_j} (1 + C_ij)^focal log(1 + exp(scale (C_ij + margin)))`.

    C is the cosine matrix of the query vectors; every ordered pair counts (one softplus per pair).
    """
    unit = F.normalize(query_vecs, dim=-1)
    cosine = unit @ unit.t()
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pairs = (1 + cosine).pow(focal) * torch.log(1 + torch.exp(scale * (cosine + margin)))
    return (pairs * same).sum() / len(labels)
