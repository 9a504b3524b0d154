"""Prototype construction for the Prototypes model (Moon et al., ICCV 2025): the paper's design and its Table 6 rivals.

Every generator starts from L_p learnable, video-agnostic prototypes (N(0, 0.02)) and maps a video's rows
[B, U, D] to prototypes [B, L_p, D] and an attention [B, L_p, U] of each prototype over the rows (summing to 1 over
the valid rows: what the weak guidance of §3.4 reads), running `iterations` rounds (K of Eq. 1) with the same
weights in every round.

- `cross_attention` (Table 6 (c), the paper's design, §3.2): only cross-attention, so the prototypes stay
  independent: `P <- LN(P + W_o MHA(P; V; V))`, post-LN and no feed-forward like the family's attention blocks.
- `perceiver` (Table 6 (a), Perceiver [20]): the latents cross-attend to the rows, then interact in a latent
  Transformer layer. Pre-LN residual blocks as in Perceiver: a single-head cross-attention (Perceiver's choice) and
  an MLP (4 D, GELU), then one latent self-attention layer (n_heads) and its MLP. One latent layer per round, since
  the paper only names the extra self-attention; all rounds share the weights (Perceiver's option beyond the first).
- `slot_attention` (Table 6 (b), Slot Attention [38]): rows and slots are LayerNormed, single-head dot-product
  attention with the softmax taken **over the slots** (slots compete for each row), plus 1e-8, renormalised over
  the rows to a weighted mean of the values; a GRU cell updates each slot from that mean, then a residual MLP
  (2 D, ReLU, as in Slot Attention). The slots start from the learned prototypes, not from samples of a learned
  Gaussian, so that the stored prototypes are deterministic and each of the L_p is its own learnable query (§3.2).

None of the cited methods uses dropout, so (a) and (b) have none; (c) keeps the family's dropout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stages.models.baselines.layers import ATTENTION_MASK_FILL

SLOT_EPS = 1e-8  # Slot Attention's epsilon before renormalising over the rows


def _learned_prototypes(count: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(count, dim).normal_(0.0, 0.02))


class CrossAttention(nn.Module):
    """Multi-head attention from `queries` to `keys`, output projection, residual and post-LayerNorm (no FFN)."""

    def __init__(self, dim: int, num_heads: int, dropout: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, queries: Tensor, keys: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """queries [B, Q, D], keys [B, K, D], mask [B, K] (1 = real key) -> ([B, Q, D], attention [B, Q, K]).

        The attention is the head average of the probabilities, before dropout.
        """
        q, k, v = self._heads(self.query(queries)), self._heads(self.key(keys)), self._heads(self.value(keys))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits + (1 - mask[:, None, None, :]) * ATTENTION_MASK_FILL
        probs = logits.softmax(dim=-1)
        attended = (self.dropout(probs) @ v).transpose(1, 2).flatten(2)
        return self.LayerNorm(self.dropout(self.dense(attended)) + queries), probs.mean(dim=1)


class PrototypeGenerator(nn.Module):
    """Table 6 (c), Eq. 1: K rounds of cross-attention from the prototypes to a video's rows."""

    def __init__(self, count: int, dim: int, num_heads: int, iterations: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.iterations = iterations
        self.prototypes = _learned_prototypes(count, dim)
        self.attention = CrossAttention(dim, num_heads, dropout, eps)

    def forward(self, rows: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """rows [B, U, D], mask [B, U] or None -> (prototypes [B, L_p, D], last attention [B, L_p, U])."""
        prototypes = self.prototypes.expand(len(rows), -1, -1)
        for _ in range(self.iterations):
            prototypes, attention = self.attention(prototypes, rows, mask)
        return prototypes, attention


class FeedForward(nn.Module):
    """Pre-LN MLP `Linear(act(Linear(LN(x))))` (its residual is added by the caller)."""

    def __init__(self, dim: int, hidden: int, activation: nn.Module, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.net = nn.Sequential(nn.Linear(dim, hidden), activation, nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.norm(x))


class PerceiverGenerator(nn.Module):
    """Table 6 (a): Perceiver rounds of cross-attention to the rows, then a latent Transformer layer."""

    def __init__(self, count: int, dim: int, num_heads: int, iterations: int, eps: float) -> None:
        super().__init__()
        self.iterations = iterations
        self.prototypes = _learned_prototypes(count, dim)
        self.latent_norm = nn.LayerNorm(dim, eps=eps)
        self.row_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attention = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.cross_mlp = FeedForward(dim, 4 * dim, nn.GELU(), eps)
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.self_mlp = FeedForward(dim, 4 * dim, nn.GELU(), eps)

    def forward(self, rows: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """rows [B, U, D], mask [B, U] or None -> (prototypes [B, L_p, D], last cross-attention [B, L_p, U])."""
        latents = self.prototypes.expand(len(rows), -1, -1)
        rows = self.row_norm(rows)
        padding = None if mask is None else mask == 0
        for _ in range(self.iterations):
            attended, attention = self.cross_attention(self.latent_norm(latents), rows, rows, key_padding_mask=padding)
            latents = latents + attended
            latents = latents + self.cross_mlp(latents)
            normed = self.self_norm(latents)
            latents = latents + self.self_attention(normed, normed, normed, need_weights=False)[0]
            latents = latents + self.self_mlp(latents)
        return latents, attention


class SlotAttentionGenerator(nn.Module):
    """Table 6 (b): Slot Attention rounds (softmax over slots, weighted mean of the rows, GRU update, MLP)."""

    def __init__(self, count: int, dim: int, iterations: int, eps: float) -> None:
        super().__init__()
        self.iterations = iterations
        self.prototypes = _learned_prototypes(count, dim)
        self.row_norm = nn.LayerNorm(dim, eps=eps)
        self.slot_norm = nn.LayerNorm(dim, eps=eps)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = FeedForward(dim, 2 * dim, nn.ReLU(), eps)

    def competition(self, slots: Tensor, keys: Tensor) -> Tensor:
        """[B, U, L_p] share of each row claimed by each slot: a softmax over the slots (keys [B, U, D])."""
        logits = keys @ self.query(self.slot_norm(slots)).transpose(1, 2) / math.sqrt(keys.shape[-1])
        return logits.softmax(dim=-1)

    def forward(self, rows: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """rows [B, U, D], mask [B, U] or None -> (slots [B, L_p, D], last row weights of each slot [B, L_p, U])."""
        rows = self.row_norm(rows)
        keys, values = self.key(rows), self.value(rows)
        slots = self.prototypes.expand(len(rows), -1, -1)
        for _ in range(self.iterations):
            share = self.competition(slots, keys) + SLOT_EPS
            if mask is not None:
                share = share * mask[..., None]
            weights = (share / share.sum(dim=1, keepdim=True)).transpose(1, 2)  # [B, L_p, U], sums to 1 over rows
            updates = weights @ values
            slots = self.gru(updates.flatten(0, 1), slots.flatten(0, 1)).view_as(updates)
            slots = slots + self.mlp(slots)
        return slots, weights
