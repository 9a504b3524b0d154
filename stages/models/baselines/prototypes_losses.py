"""The auxiliary objectives of the Prototypes model (Moon et al., ICCV 2025), one function per equation.

- `sample_shared_mask`: the masked word set M of §3.3.1, shared by every query of a batch.
- `masked_token_nce`: Eq. 4, cross-modal reconstruction (InfoNCE over all masked tokens of the batch, cosine).
- `reconstruction_error`: Eq. 5, uni-modal reconstruction (squared L2 per row, mean over the valid rows).
- `attention_guidance_loss`: Eq. 7, margin BCE on the attention mass the retrieved prototype puts on video 1.
- `orthogonal_loss`: Eq. 8, positive cosine overlap between the prototypes of one video.

The retrieval loss (multi-positive InfoNCE + triplet) is the shared one of `losses.py`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def word_positions(token_mask: Tensor) -> Tensor:
    """[N_q, L] bool: the tokens that can be masked, i.e. every valid token but the first and the last.

    With CLIP tokens these are SOT and EOT (EOT carries the sentence embedding and is kept as context).
    """
    lengths = token_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(token_mask.shape[1], device=token_mask.device)[None]
    return (positions >= 1) & (positions < lengths - 1)


def sample_shared_mask(token_mask: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Draw the masked positions M once per batch (§3.3.1: "M is shared") and apply them to every query.

    M holds `max(1, round(ratio * C))` positions drawn uniformly from the C positions that are a word in at least one
    query, so each query loses about `ratio` of its words; a query masks the positions of M that are its own words.

    Args:
        token_mask: [N_q, L] 1 for real tokens, 0 for padding.
        ratio: fraction of word positions to mask.
        generator: random source (the global one when None).

    Returns:
        [N_q, L] bool, True where the token is replaced by the mask embedding.
    """
    words = word_positions(token_mask)
    candidates = words.any(dim=0).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return torch.zeros_like(words)
    count = max(1, round(ratio * candidates.numel()))
    order = torch.randperm(candidates.numel(), generator=generator, device="cpu").to(candidates.device)
    shared = torch.zeros(token_mask.shape[1], dtype=torch.bool, device=token_mask.device)
    shared[candidates[order[:count]]] = True
    return words & shared[None]


def masked_token_nce(reconstructed: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Eq. 4: each reconstructed masked token against every masked backbone token of the batch.

    Args:
        reconstructed: [N, d] the decoder outputs at the N masked positions of the batch.
        targets: [N, d] the backbone token features at the same positions (row i is the positive of row i).
        temperature: divides the cosine logits (the paper's equation has none, i.e. 1).
    """
    logits = F.normalize(reconstructed, dim=-1) @ F.normalize(targets, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def reconstruction_error(reconstructed: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Eq. 5: squared L2 distance per row, averaged over the valid rows of each video, then over videos.

    Args:
        reconstructed: [B, L, d] decoded rows.
        targets: [B, L, d] the input features.
        mask: [B, L] 1 for valid rows.
    """
    mask = mask.to(reconstructed.dtype)
    per_row = (reconstructed - targets).pow(2).sum(dim=-1)
    return ((per_row * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).mean()


def attention_guidance_loss(first_mass: Tensor, first_is_relevant: Tensor, margin: float = 0.2) -> Tensor:
    """Eq. 7: `-[L log(a + b) + (1 - L) log(1 - (a - b))]`, averaged over (query, mixed video) pairs.

    Args:
        first_mass: [N] attention mass a in [0, 1] that the retrieved prototype puts on the first video.
        first_is_relevant: [N] bool label L: the query belongs to the first video of the pair.
        margin: b; keeps both logarithms finite and bounds the loss when similar videos are mixed.
    """
    eps = torch.finfo(first_mass.dtype).tiny
    positive = -torch.log((first_mass + margin).clamp_min(eps))
    negative = -torch.log((1 - (first_mass - margin)).clamp_min(eps))
    return torch.where(first_is_relevant, positive, negative).mean()


def orthogonal_loss(prototypes: Tensor, norm: Literal["fro", "l1"] = "fro") -> Tensor:
    """Eq. 8: `||max(P P^T, 0) - I|| / (L_p (L_p - 1))` on the cosine Gram matrix, averaged over videos.

    Only positive cosine similarities are penalised. The diagonal of the cosine Gram matrix equals I by construction
    and is left out exactly, so that orthonormal prototypes give exactly 0.

    Args:
        prototypes: [B, L_p, D] the prototypes of B videos.
        norm: "fro" (the matrix norm of Eq. 8) or "l1" (sum of absolute entries: the mean positive overlap).
    """
    count = prototypes.shape[1]
    unit = F.normalize(prototypes, dim=-1)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=prototypes.device)
    overlap = (unit @ unit.transpose(1, 2)).clamp_min(0) * off_diagonal
    per_video = torch.linalg.matrix_norm(overlap) if norm == "fro" else overlap.sum(dim=(1, 2))
    return (per_video / max(1, count * (count - 1))).mean()
