"""A torch Dataset of `nf` cached frames per video, as uint8 [nf, S, S, 3] (normalise on the device).

    loader = DataLoader(FrameDataset(cache, ids, nf=32, train=True), batch_size=24, num_workers=8)
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)   # before iterating: workers copy the dataset when the iterator starts
        for frames, index in loader: ...

Training indices are random but deterministic: item `index` of epoch `epoch` draws from numpy's legacy
`RandomState` (the official sampler's generator) seeded with (seed, epoch, index), so a run gives the same frames
whatever the number of workers, and a resumed run the same frames as an uninterrupted one. The official loader
instead draws from one stream per worker, reseeded by PyTorch at every epoch, which no other loader layout (or
PyTorch version) reproduces; the rule that turns a draw into indices is the official one (`stages.data.sampling`).
Do not use `persistent_workers=True` with training sets: workers would keep the epoch they started with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from stages.data.frame_cache import FrameCache
from stages.data.sampling import eval_indices, train_indices


class FrameDataset(torch.utils.data.Dataset):
    """Item `index`: (uint8 tensor [nf, S, S, 3] of video `video_ids[index]`, index)."""

    def __init__(
        self,
        cache: FrameCache | str | Path,
        video_ids: Sequence[str],
        nf: int,
        train: bool,
        tail_fix: bool = False,
        seed: int = 0,
    ) -> None:
        if nf < 1:
            raise ValueError(f"nf must be >= 1, got {nf}")
        self.cache = cache if isinstance(cache, FrameCache) else FrameCache(cache)
        self.video_ids = list(video_ids)
        self.nf = nf
        self.train = train
        self.tail_fix = tail_fix
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random offsets training items use."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.video_ids)

    def indices(self, index: int) -> np.ndarray:
        """The frame indices item `index` reads in the current epoch."""
        num_frames = self.cache.num_frames(self.video_ids[index])
        if not self.train:
            return eval_indices(num_frames, self.nf, self.tail_fix)
        rng = np.random.RandomState([self.seed, self.epoch, index])
        return train_indices(num_frames, self.nf, rng, self.tail_fix)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        frames = self.cache.read(self.video_ids[index], self.indices(index))
        return torch.from_numpy(frames), index
