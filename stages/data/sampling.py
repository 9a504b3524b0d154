"""Which `nf` of a video's `num_frames` cached frames a sample uses (ProPy's `dataloaders/sampling.py` rules).

Faithful mode reproduces the official index rules, defects included:
  * train (TSN, random offset): a = num_frames // nf; index_i = i * a + r_i, where r_0..r_{nf-1} are one draw of
    numpy's legacy `RandomState.randint(a, size=nf)` (the official code draws from numpy's global legacy generator;
    for a = 1 the draw is all zeros and consumes nothing). The floor drops the last num_frames mod nf frames (for
    nf <= num_frames < 2 nf only the first nf frames are ever used). A video shorter than nf gives 0, 1, ...,
    num_frames - 1 followed by copies of its last frame, with no draw. Given the same generator state, the indices
    equal the official ones; the official state itself (one global stream per DataLoader worker, reseeded by
    PyTorch every epoch from its base seed and the worker id) cannot be reproduced, so `FrameDataset` seeds one
    `RandomState` per item instead (see there).
  * eval (segment centres): index_i = int(num_frames / (2 nf) + i * num_frames / nf) when num_frames > nf,
    otherwise as train for short videos (0..num_frames-1, then the last frame repeated).
`tail_fix=True` covers the whole video in both modes:
  * train: index_i = floor((i + U_i) * num_frames / nf), U_i ~ U[0, 1) (`random_sample`): one draw inside each of nf
    equal segments of the whole video (short videos repeat frames evenly instead of padding with the last one).
  * eval: index_i = floor((i + 1/2) * num_frames / nf), the centre of each segment, for every length. For
    num_frames > nf this equals the official rule; shorter videos repeat frames evenly in time.
"""

from __future__ import annotations

import numpy as np


def train_indices(num_frames: int, nf: int, rng: np.random.RandomState, tail_fix: bool = False) -> np.ndarray:
    """Training frame indices (int64 [nf], non-decreasing) with a random offset inside each segment."""
    _check(num_frames, nf)
    if tail_fix:
        return np.floor((np.arange(nf) + rng.random_sample(nf)) * num_frames / nf).astype(np.int64)
    segment = num_frames // nf
    if segment == 0:
        return _pad_with_last(num_frames, nf)
    return np.arange(nf, dtype=np.int64) * segment + rng.randint(segment, size=nf).astype(np.int64)


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
