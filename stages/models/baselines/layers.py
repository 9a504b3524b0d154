"""Building blocks shared by the MS-SL code family, with the official parameter names (state dicts load unchanged).

- `InputProjection`: LayerNorm -> Dropout -> Linear -> ReLU (`LayerNorm.*`, `net.1.*`).
- `PositionalEncoding`: `LN(x + E[0:L])` -> Dropout (`position_embeddings.weight`, `LayerNorm.*`).
- `AttentionBlock`: one multi-head self-attention sub-layer with residual and post-LN and no feed-forward
  (`self.{query,key,value}.*`, `output.dense.*`, `output.LayerNorm.*`); optionally with GMMFormer's Gaussian mask
  (or any given weights, e.g. AMDNet's span masks) multiplying the scaled logits.
- `gaussian_window`: the family's max-normalised Gaussian weights (GMMFormer's fixed masks, AMDNet's learned spans).
- `GMMBlock`: the mean of four attention blocks `attn0..attn3` (plain and Gaussian widths 0.5, 1, 5).
- `TransformerLayer`: GMMFormer v2's post-LN transformer layer, attention without an output projection, then a ReLU
  feed-forward (`self.{query,key,value}.*`, `output.layer{1,2}.*`, `norm{1,2}.*`); self-attention (optionally
  Gaussian) or cross-attention to a context, with an optional additive per-key logit bias; its attention module
  can be swapped (HLFormer's Lorentz branches).
- `BranchMixture`: GMMFormer v2's dynamic mixture of parallel branches (DyGMM, HLFormer's block): a token
  cross-attends to every branch output (`ca`), `layer1`/`layer2` give per-position branch logits, a softmax over the
  branches weights the outputs.
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
    Very narrow widths on very short sequences (w = 0.1 for L <= 4) underflow and are refused.
    Cached per (length, width, device); the returned tensor must not be modified in place. It is made outside
    inference mode, so a mask first cached by an evaluation also serves training.
    """
    with torch.inference_mode(False):
        centres = (torch.arange(length, dtype=torch.float32, device=device) / length)[:, None]
        width_tensor = torch.tensor(width, dtype=torch.float32, device=device)
        grid = torch.linspace(0, 1, length, dtype=torch.float32, device=device)
        mask = gaussian_window(grid, centres, width_tensor)
    if mask.isnan().any():
        raise ValueError(f"Gaussian width {width} is too narrow for length {length}: a row underflows to 0 in float32")
    return mask


def gaussian_window(
    grid: torch.Tensor, centres: torch.Tensor, widths: torch.Tensor, stable: bool = False
) -> torch.Tensor:
    """Gaussian weights over `grid` [L], rescaled to max 1 per row: the official recipe of GMMFormer and AMDNet.

    `sigma = max(width, 0.01) / 9`, `raw = (1 / sqrt(2 pi) / sigma) exp(-(grid - centre)^2 / (2 sigma^2))`, then
    `raw / max(raw)`. `centres` and `widths` broadcast against each other (e.g. [..., 1]); the result is [..., L].
    When sigma is so small that every grid point underflows in float32 the official division is 0 / 0 = NaN;
    `stable` rescales in the log domain instead (`exp(-(d^2 - min d^2) / (2 sigma^2))`, equal wherever the official
    recipe is finite, and never NaN).
    """
    sigma = widths.clamp(min=GAUSS_MIN_WIDTH) / GAUSS_SIGMA_DIVISOR
    if stable:
        squared = (grid - centres) ** 2
        return torch.exp(-(squared - squared.min(dim=-1, keepdim=True).values) / (2 * sigma**2))
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
        context: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries from x [B, L, D], keys and values from `context` [B, L_k, D] (default x); `mask` [B, L_k] is 1 at
        real keys; the Gaussian [L, L_k] multiplies the scaled logits, then `key_bias` [B, L_k] and the mask add."""
        context = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if gauss is not None:
            logits = logits * gauss
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, :]
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

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, logit_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, L, D], mask [B, L] (1 = real key, None = no padding) -> [B, L, D].

        `logit_weights` (broadcast to [B, H, L, L]) multiply the scaled logits instead of the block's Gaussian mask,
        e.g. AMDNet's per-video, per-head span masks [B, H, 1, L].
        """
        if logit_weights is None and self.gauss_width is not None:
            logit_weights = gaussian_mask(x.shape[1], self.gauss_width, x.device)
        return self.output(self.self(x, mask, logit_weights), x)


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


class _FeedForward(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear -> Dropout (the official `output` of a transformer layer)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden)
        self.layer2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer2(self.dropout(F.relu(self.layer1(x)))))


class TransformerLayer(nn.Module):
    """GMMFormer v2's post-LN transformer layer: `h = LN1(x + attn(x))`, `out = LN2(h + FFN(h))`.

    The concatenated heads are added to x as they are (no output projection). Self-attention by default, optionally
    with a Gaussian width (mask multiplied into the scaled logits, as in `AttentionBlock`); cross-attention when a
    `context` is given (queries from x, keys and values from the context).

    Args:
        dim: hidden size D.
        num_heads: attention heads.
        dropout: attention-probability, residual and feed-forward dropout.
        ffn_size: hidden width of the feed-forward (officially 4 D, and D in the cross-attention).
        gauss_width: Gaussian width of the self-attention (None: plain).
        eps: LayerNorm epsilon.
        attention: the attention module, called as `attention(x, mask, gauss, context, key_bias)` (default:
            multi-head scaled dot-product attention, the official `BertSelfAttention`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dropout: float,
        ffn_size: int,
        gauss_width: float | None = None,
        eps: float = 1e-5,
        attention: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.gauss_width = gauss_width
        self.self = _SelfAttention(dim, num_heads, dropout) if attention is None else attention
        self.output = _FeedForward(dim, ffn_size, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, L, D], mask [B, L_k] (1 = real key), context [B, L_k, D], key_bias [B, L_k] -> [B, L, D]."""
        gauss = None
        if self.gauss_width is not None:
            if context is not None:
                raise ValueError("a Gaussian width applies to self-attention only")
            gauss = gaussian_mask(x.shape[1], self.gauss_width, x.device)
        hidden = self.norm1(x + self.dropout(self.self(x, mask, gauss, context, key_bias)))
        return self.norm2(hidden + self.output(hidden))


class BranchMixture(nn.Module):
    """GMMFormer v2's dynamic mixture of parallel branches over sequences of exactly `length` positions.

    A token cross-attends to each branch output o_k (`ca`: FFN width D, the block's key mask), giving tau_k;
    `z = layer2(Dropout(ReLU(layer1(tau))))` [B, K, L] is a logit per branch and position, and
    `out[b, t] = sum_k softmax_k(z[b, :, t] / sft_factor) o_k[b, t]`. A subclass registers its branches, then calls
    `_add_mixer` (the official parameter order), and chooses the token: GMMFormer v2's learned `weight_token`,
    HLFormer's mean of the branch outputs.
    """

    def _add_mixer(self, dim: int, num_heads: int, dropout: float, length: int, sft_factor: float, eps: float) -> None:
        self.length, self.sft_factor = length, sft_factor
        self.ca = TransformerLayer(dim, num_heads, dropout, dim, eps=eps)
        self.layer1 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer2 = nn.Linear(dim, length)

    def check_length(self, x: torch.Tensor) -> None:
        """Refuse an input x [B, L, D] whose L is not the block's length."""
        if x.shape[1] != self.length:
            raise ValueError(f"the block is built for {self.length} positions, got {x.shape[1]}")

    def branch_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, L, K] mixing weights: softmax over the branches of the logits [B, K, L] divided by sft_factor."""
        return torch.softmax(logits.transpose(1, 2) / self.sft_factor, dim=-1)

    def mix(self, branches: torch.Tensor, token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, L, D]: the branch outputs [B, K, L, D] mixed with the weights that `token` [1 or B, 1, D] reads (one
        `ca` call over all branches; key mask [B, L])."""
        batch, num_branches, length, dim = branches.shape
        queries = token.expand(batch, num_branches, dim).reshape(batch * num_branches, 1, dim)
        keys_mask = None if mask is None else mask.repeat_interleave(num_branches, dim=0)
        tokens = self.ca(queries, keys_mask, context=branches.reshape(batch * num_branches, length, dim))
        logits = self.layer2(self.dropout(F.relu(self.layer1(tokens.view(batch, num_branches, dim)))))
        return torch.einsum("blk,bkld->bld", self.branch_weights(logits), branches)


def attention_pool(hidden: torch.Tensor, mask: torch.Tensor, scorer: nn.Linear) -> torch.Tensor:
    """Pool [B, L, D] into [B, D] with softmax weights `scorer(h_t)` over the positions where `mask` is 1."""
    logits = scorer(hidden).squeeze(-1)
    logits = logits * mask + (1 - mask) * POOLING_MASK_FILL
    weights = torch.softmax(logits, dim=-1)
    return (weights.unsqueeze(-1) * hidden).sum(dim=1)
