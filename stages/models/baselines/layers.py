"""Building blocks shared by the MS-SL code family, with the official parameter names (state dicts load unchanged).

- `InputProjection`: LayerNorm -> Dropout -> Linear -> ReLU (`LayerNorm.*`, `net.1.*`).
- `PositionalEncoding`: `LN(x + E[0:L])` -> Dropout (`position_embeddings.weight`, `LayerNorm.*`).
- `AttentionBlock`: one multi-head self-attention sub-layer with residual and post-LN and no feed-forward
  (`self.{query,key,value}.*`, `output.dense.*`, `output.LayerNorm.*`); optionally with GMMFormer's Gaussian mask
  that multiplies the scaled logits.
- `GMMBlock`: the mean of four attention blocks `attn0..attn3` (plain and Gaussian widths 0.5, 1, 5).
- `TransformerLayer`: GMMFormer v2's post-LN layer, attention -> add & LN -> FFN -> add & LN, without an output
  projection (`self.*`, `output.layer{1,2}.*`, `norm{1,2}.*`); its attention module can be swapped (HLFormer's
  Lorentz branches). `CrossAttentionLayer`: the same with queries attending to another sequence, FFN width D.
- `BranchMixture`: GMMFormer v2's dynamic mixture of parallel branches: a token cross-attends to every branch
  output (`ca`), `layer1`/`layer2` give per-position branch logits, a softmax over branches weights the outputs.
- `attention_pool`: the "modular vector" pooling of a sequence into one vector.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MASK_FILL = -10000.0  # added to the logits of padded keys
POOLING_MASK_FILL = -1e10  # pooling logits of padded positions
GAUSS_SIGMA_DIVISOR = 9.0
GAUSS_MIN_WIDTH = 0.01
_GAUSS_NORM = 0.3989422804014327  # 1 / sqrt(2 pi)


def init_weights(module: nn.Module) -> None:
    """Official initialisation: Linear/Embedding N(0, 0.02), biases 0, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class InputProjection(nn.Module):
    """LayerNorm -> Dropout -> Linear -> ReLU (the official `LinearLayer`)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(in_dim, eps=eps)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net(self.LayerNorm(x)))


class PositionalEncoding(nn.Module):
    """Trainable absolute positions counted from the first (padded-batch) position, then LayerNorm and dropout."""

    def __init__(self, max_positions: int, dim: int, dropout: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = self.position_embeddings.weight[: x.shape[1]]
        return self.dropout(self.LayerNorm(x + positions))


@functools.lru_cache(maxsize=64)
def gaussian_mask(length: int, width: float, device: torch.device | None = None) -> torch.Tensor:
    """GMMFormer's [L, L] Gaussian logit mask (float32, rows rescaled to max 1), official quirks kept.

    Row i is centred at i / L while the column grid is linspace(0, 1, L) = j / (L - 1), so the peak drifts left.
    Cached per (length, width, device); the returned tensor must not be modified in place.
    """
    centres = (torch.arange(length, dtype=torch.float32, device=device) / length)[:, None]
    grid = torch.linspace(0, 1, length, dtype=torch.float32, device=device)[None, :]
    sigma = torch.tensor(max(width, GAUSS_MIN_WIDTH), dtype=torch.float32, device=device) / GAUSS_SIGMA_DIVISOR
    raw = _GAUSS_NORM / sigma * torch.exp(-((grid - centres) ** 2) / (2 * sigma**2))
    return raw / raw.max(dim=-1, keepdim=True).values


class _SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (the official `BertSelfAttention`)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        gauss: torch.Tensor | None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries from x [B, Lq, D]; keys and values from `memory` [B, Lk, D] (default x), key mask [B, Lk]."""
        memory = x if memory is None else memory
        q, k, v = self._heads(self.query(x)), self._heads(self.key(memory)), self._heads(self.value(memory))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if gauss is not None:
            logits = logits * gauss
        if mask is not None:
            logits = logits + (1 - mask[:, None, None, :]) * ATTENTION_MASK_FILL
        probs = self.dropout(torch.softmax(logits, dim=-1))
        return (probs @ v).transpose(1, 2).flatten(2)


class _SelfOutput(nn.Module):
    """Linear -> Dropout -> residual -> LayerNorm (the official `BertSelfOutput`)."""

    def __init__(self, dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class AttentionBlock(nn.Module):
    """One self-attention sub-layer with residual and post-LN, no feed-forward (the official `BertAttention`).

    Args:
        dim: hidden size D.
        num_heads: attention heads (D must be a multiple).
        dropout: attention-probability and output dropout.
        gauss_width: GMMFormer's Gaussian width (None: plain attention); the [L, L] mask multiplies the scaled logits
            before the key mask is added, L being the (padded) sequence length of the call.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self, dim: int, num_heads: int, dropout: float, gauss_width: float | None = None, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.gauss_width = gauss_width
        self.self = _SelfAttention(dim, num_heads, dropout)
        self.output = _SelfOutput(dim, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D], mask [B, L] (1 = real key, None = no padding) -> [B, L, D]."""
        gauss = None if self.gauss_width is None else gaussian_mask(x.shape[1], self.gauss_width, x.device)
        return self.output(self.self(x, mask, gauss), x)


class GMMBlock(nn.Module):
    """GMMFormer's block: the mean of parallel attention blocks `attn0..` with their own Gaussian widths."""

    def __init__(
        self, dim: int, num_heads: int, dropout: float, widths: tuple[float | None, ...], eps: float = 1e-5
    ) -> None:
        super().__init__()
        for index, width in enumerate(widths):
            self.add_module(f"attn{index}", AttentionBlock(dim, num_heads, dropout, width, eps))

    def branches(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The output of every branch."""
        return [branch(x, mask) for branch in self.children()]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack(self.branches(x, mask)).mean(dim=0)


class FeedForward(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear (`layer1`, `layer2`)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.layer2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.dropout(F.relu(self.layer1(x))))


class TransformerLayer(nn.Module):
    """Post-LN transformer layer without an output projection (GMMFormer v2's and HLFormer's attention blocks).

    `h = LN_norm1(x + Dropout(A(x)))`, `out = LN_norm2(h + Dropout(FFN(h)))`, A the concatenated attention heads.

    Args:
        dim: hidden size D.
        num_heads: attention heads.
        dropout: dropout of the attention weights, after the attention, inside and after the FFN.
        ffn_dim: hidden width of the FFN.
        gauss_width: GMMFormer's Gaussian width (None: plain); the mask multiplies the scaled logits before the key
            mask is added.
        eps: LayerNorm epsilon.
        attention: the attention module `A(x, key_mask, gauss)` (default: multi-head scaled dot-product attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dropout: float,
        ffn_dim: int,
        gauss_width: float | None = None,
        eps: float = 1e-5,
        attention: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.gauss_width = gauss_width
        self.self = attention if attention is not None else _SelfAttention(dim, num_heads, dropout)
        self.output = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D], key mask [B, L] (None: no padding) -> [B, L, D]."""
        gauss = None if self.gauss_width is None else gaussian_mask(x.shape[1], self.gauss_width, x.device)
        return self.add_and_feed_forward(x, self.self(x, mask, gauss))

    def add_and_feed_forward(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual, norm and feed-forward half of the layer."""
        hidden = self.norm1(x + self.dropout1(attended))
        return self.norm2(hidden + self.dropout2(self.output(hidden)))


class CrossAttentionLayer(TransformerLayer):
    """`TransformerLayer` whose queries attend to another sequence; FFN width D (GMMFormer v2's `ca`)."""

    def __init__(self, dim: int, num_heads: int, dropout: float, eps: float = 1e-5) -> None:
        super().__init__(dim, num_heads, dropout, ffn_dim=dim, eps=eps)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [B, Lq, D] attends to memory [B, L, D] (key mask [B, L]) -> [B, Lq, D]."""
        return self.add_and_feed_forward(query, self.self(query, mask, None, memory))


class BranchMixture(nn.Module):
    """Base of GMMFormer v2-style blocks: parallel branches over one input, mixed per position.

    `tau_i = CA(token, o_i, key mask)`, `z = layer2(Dropout(ReLU(layer1(tau))))` [B, n, L_fix],
    `pi[b, t, :] = softmax_i(z[b, :, t] / sft)`, `out[b, t] = sum_i pi[b, t, i] o_i[b, t]`. The input length must be
    L_fix. A subclass registers its branches, then calls `_add_mixer` (the official parameter order).
    """

    def _add_mixer(self, dim: int, num_heads: int, dropout: float, fixed_len: int, sft: float, eps: float) -> None:
        self.fixed_len, self.sft = fixed_len, sft
        self.ca = CrossAttentionLayer(dim, num_heads, dropout, eps)
        self.layer1 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer2 = nn.Linear(dim, fixed_len)

    def branch_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """pi [B, L_fix, n] of the branch logits z [B, n, L_fix]."""
        return torch.softmax(logits.transpose(1, 2) / self.sft, dim=-1)

    def mix(self, outputs: list[torch.Tensor], token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mix the branch outputs [B, L_fix, D] with weights read by `token` [B, 1, D] (one `ca` call for all)."""
        stacked = torch.stack(outputs, dim=1)  # [B, n, L, D]
        batch, branches, length, dim = stacked.shape
        if length != self.fixed_len:
            raise ValueError(f"this block mixes sequences of exactly {self.fixed_len} positions, got {length}")
        tokens = token.expand(batch, branches, dim).reshape(batch * branches, 1, dim)
        memory_mask = None if mask is None else mask.repeat_interleave(branches, dim=0)
        read = self.ca(tokens, stacked.flatten(0, 1), memory_mask).view(batch, branches, dim)
        logits = self.layer2(self.dropout(F.relu(self.layer1(read))))
        weights = self.branch_weights(logits)  # [B, L, n]
        return (stacked * weights.transpose(1, 2)[..., None]).sum(dim=1)


def attention_pool(hidden: torch.Tensor, mask: torch.Tensor, scorer: nn.Linear) -> torch.Tensor:
    """Pool [B, L, D] into [B, D] with softmax weights `scorer(h_t)` over the positions where `mask` is 1."""
    logits = scorer(hidden).squeeze(-1)
    logits = logits * mask + (1 - mask) * POOLING_MASK_FILL
    weights = torch.softmax(logits, dim=-1)
    return (weights.unsqueeze(-1) * hidden).sum(dim=1)
