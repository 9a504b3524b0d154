"""Which `nf` of a video's `num_frames` cached frames a sample uses (ProPy's `dataloaders/sampling.py` rules).

Faithful mode reproduces the official index rules, defects included:
  * train (TSN, random offset): a = num_frames // nf; index_i = i * a + randint(a). The floor drops the last
    num_frames mod nf frames (for nf <= num_frames < 2 nf only the first nf frames are ever used). A video shorter
    than nf gives 0, 1, ..., num_frames - 1 followed by copies of its last frame.
  * eval (segment centres): index_i = int(num_frames / (2 nf) + i * num_frames / nf) when num_frames > nf,
    otherwise as train for short videos (0..num_frames-1, then the last frame repeated).
`tail_fix=True` covers the whole video in both modes:
  * train: index_i = floor((i + U_i) * num_frames / nf), U_i ~ U[0, 1): one uniform draw inside each of nf
    equal segments of the whole video (short videos repeat frames evenly instead of padding with the last one).
  * eval: index_i = floor((i + 1/2) * num_frames / nf), the centre of each segment, for every length. For
    num_frames > nf this equals the official rule; shorter videos repeat frames evenly in time.
"""

from __future__ import annotations

import numpy as np


def train_indices(num_frames: int, nf: int, rng: np.random.Generator, tail_fix: bool = False) -> np.ndarray:
    """Training frame indices (int64 [nf], non-decreasing) with a random offset inside each segment."""
    _check(num_frames, nf)
    if tail_fix:
        return np.floor((np.arange(nf) + rng.random(nf)) * num_frames / nf).astype(np.int64)
    segment = num_frames // nf
    if segment == 0:
        return _pad_with_last(num_frames, nf)
    return np.arange(nf, dtype=np.int64) * segment + rng.integers(0, segment, size=nf)


def eval_indices(num_frames: int, nf: int, tail_fix: bool = False) -> np.ndarray:
    """Evaluation frame indices (int64 [nf], non-decreasing): segment centres."""
    _check(num_frames, nf)
    if tail_fix:
        return (2 * np.arange(nf, dtype=np.int64) + 1) * num_frames // (2 * nf)
    if num_frames <= nf:
        return _pad_with_last(num_frames, nf)
    return np.array([int(num_frames / (2 * nf) + i * num_frames / nf) for i in range(nf)], dtype=np.int64)


def _pad_with_last(num_frames: int, nf: int) -> np.ndarray:
    return np.minimum(np.arange(nf, dtype=np.int64), num_frames - 1)


def _check(num_frames: int, nf: int) -> None:
    if num_frames < 1 or nf < 1:
        raise ValueError(f"need at least one frame and nf >= 1, got num_frames={num_frames}, nf={nf}")
