"""Feature preprocessing of the MS-SL code family (MS-SL, GMMFormer and their descendants), with its exact arithmetic.

Videos (raw [T, d_v] frame features) give two inputs:
- the *clip tensor*: `l2n(resample(X, M bins))`, always M rows, bin edges computed in float32;
- the *frame sequence*: `l2n(X)` if T <= max_ctx_l, else `l2n(resample(X, max_ctx_l bins))`, edges in float64.
Both run in float64 (the official frame reader returns Python floats; AMDNet's reader stays in float32:
`resample_precision`) and are cast to float32 at the end. Queries (raw [L, d_t] token features) are l2-normalised in
float32 and truncated to `max_desc_l` tokens, or reduced to their last row, CLIP's EOT token (`sentence_query`: the
sentence vector that AMDNet reads).

Bin edges: `e_k = min(round_half_even(k / n * T), T - 1)`, k = 0..n; output row i is the mean of rows
`e_i .. e_{i+1} - 1`, or the single row `e_i` when the range is empty. The clamp to T - 1 makes the last frame unused
unless `e_{n-1} = T - 1` (the official quirk, on by default; `clamp_last_edge=False` keeps it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw features become model inputs (defaults: the official MS-SL/GMMFormer settings)."""

    map_size: int = 32  # M: rows of the clip tensor
    max_ctx_l: int = 128  # frame sequences longer than this are resampled to it
    max_desc_l: int = 30  # query tokens kept (use >= 32 for CLIP tokens so that EOT survives)
    l2_eps: float = 1e-5  # added to the row norm (not a clamp)
    normalize: bool = True  # l2-normalise rows (AMDNet-style models turn this off)
    clamp_last_edge: bool = True  # official: clamp bin edges to T - 1, which drops the last frame
    resample_precision: Literal["float64", "float32"] = "float64"  # arithmetic of the bin means (AMDNet: float32)
    sentence_query: bool = False  # a query is its last row (CLIP's EOT token, the sentence vector), not its tokens

    def video_inputs(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """The model inputs of one video's raw frame features [T, d_v], keyed like `data.VideoItem`'s fields:
        `clip` [M, d_v] and `frames` [L_f, d_v] (a model with other video inputs overrides this, e.g. MSC)."""
        return {"clip": clip_tensor(frames, self), "frames": frame_sequence(frames, self)}


def l2_normalize(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Row-wise `x / (||x||_2 + eps)` in the dtype of `x`."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + x.dtype.type(eps))


def bin_edges(num_rows: int, num_bins: int, precision: str = "float32", clamp_last_edge: bool = True) -> np.ndarray:
    """The n + 1 resampling edges of a sequence of `num_rows` rows (see the module docstring).

    Args:
        num_rows: T, the length of the input sequence (>= 1).
        num_bins: n, the number of output rows.
        precision: "float32" (clip path) or "float64" (frame path): the arithmetic of `k / n * T`.
        clamp_last_edge: clamp edges to T - 1 (official) instead of T.
    """
    dtype = np.dtype(precision).type
    fractions = np.arange(num_bins + 1, dtype=dtype) / dtype(num_bins)
    edges = np.round(fractions * dtype(num_rows)).astype(np.int64)
    return np.minimum(edges, num_rows - 1 if clamp_last_edge else num_rows)


def bin_ranges(edges: np.ndarray) -> np.ndarray:
    """[n, 2] (start, end_exclusive) input rows averaged into each output row; a copied single row s is (s, s + 1)."""
    starts = edges[:-1]
    ends = np.where(edges[1:] > starts, edges[1:], starts + 1)
    return np.stack([starts, ends], axis=1)


def resample(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Average the rows of `x` into `len(edges) - 1` bins (an empty bin copies its start row).

    Each bin's rows are added one after the other, as the official means do (in float32 the order shows).
    """
    ranges = bin_ranges(edges)
    starts, counts = ranges[:, 0], ranges[:, 1] - ranges[:, 0]
    sums = np.zeros((len(ranges), *x.shape[1:]), dtype=x.dtype)
    for offset in range(int(counts.max())):
        active = offset < counts
        sums[active] += x[starts[active] + offset]
    return sums / counts.astype(x.dtype)[:, None]


def clip_tensor(frames: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The [M, d_v] float32 clip tensor of one video's raw frame features [T, d_v]."""
    x = np.asarray(frames, dtype=cfg.resample_precision)
    out = resample(x, bin_edges(len(x), cfg.map_size, "float32", cfg.clamp_last_edge))
    return (l2_normalize(out, cfg.l2_eps) if cfg.normalize else out).astype(np.float32)


def frame_sequence(frames: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The [min(T, max_ctx_l), d_v] float32 frame sequence of one video's raw frame features [T, d_v]."""
    x = np.asarray(frames, dtype=cfg.resample_precision)
    if len(x) > cfg.max_ctx_l:
        x = resample(x, bin_edges(len(x), cfg.max_ctx_l, "float64", cfg.clamp_last_edge))
    return (l2_normalize(x, cfg.l2_eps) if cfg.normalize else x).astype(np.float32)


def query_tokens(tokens: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The [min(L, max_desc_l), d_t] float32 token features of one query (normalised in float32, then truncated), or
    its [1, d_t] last row with `sentence_query`."""
    x = np.asarray(tokens, dtype=np.float32)
    x = l2_normalize(x, cfg.l2_eps) if cfg.normalize else x
    return x[-1:] if cfg.sentence_query else x[: cfg.max_desc_l]


def frame_ranges(num_rows: int, cfg: PreprocessConfig) -> np.ndarray:
    """[max_ctx_l, 2] input ranges of each frame-sequence row ((t, t + 1) when kept, (-1, -1) beyond T)."""
    if num_rows > cfg.max_ctx_l:
        return bin_ranges(bin_edges(num_rows, cfg.max_ctx_l, "float64", cfg.clamp_last_edge))
    out = np.full((cfg.max_ctx_l, 2), -1, dtype=np.int64)
    out[:num_rows, 0] = np.arange(num_rows)
    out[:num_rows, 1] = np.arange(1, num_rows + 1)
    return out


def clip_ranges(num_rows: int, cfg: PreprocessConfig) -> np.ndarray:
    """[M, 2] input ranges of each clip-tensor row."""
    return bin_ranges(bin_edges(num_rows, cfg.map_size, "float32", cfg.clamp_last_edge))
