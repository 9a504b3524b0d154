"""A torch Dataset of `nf` cached frames per video, as uint8 [nf, S, S, 3] (normalise on the device).

    loader = DataLoader(FrameDataset(cache, ids, nf=32, train=True), batch_size=24, num_workers=8,
                        collate_fn=collate_frames)
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)   # before iterating: workers copy the dataset when the iterator starts
        for frames, index in loader: ...

Training indices are random but deterministic: item `index` of epoch `epoch` draws from numpy's legacy
`RandomState` (the official sampler's generator) seeded with (seed, epoch, index), so a run gives the same frames
whatever the number of workers, and a resumed run the same frames as an uninterrupted one. The official loader
instead draws from one stream per worker, reseeded by PyTorch at every epoch, which no other loader layout (or
PyTorch version) reproduces; the rule that turns a draw into indices is the official one (`stages.data.sampling`).
Do not use `persistent_workers=True` with training sets: workers would keep the epoch they started with.

A DataLoader fetches a whole batch at once (`__getitems__`): its frames are decoded straight into one batch tensor,
in shared memory when a worker builds it, and `collate_frames` passes that tensor on without copying it, so a batch
crosses to the training process without any further copy. A fresh shared-memory batch costs more than reading raw
frames into it (the kernel allocates, zeroes, maps and frees 150 KB per frame); `share_batches` reuses a fixed set
of shared-memory slots instead, and the training process gives each batch back once it has used it:

    dataset.share_batches(batch_size, slots=2 * num_workers + 2)   # before the DataLoader starts its workers
    for frames, index in loader:            # frames: a `BatchSlot`
        batch = dataset.take(frames)        # uint8 [B, nf, S, S, 3], valid until given back
        ...
        dataset.give_back(frames)

With `encoded=True` (JPEG caches) items carry the compressed frames instead (`EncodedFrames`), a tenth of the bytes,
and the training process decodes them on its device (`EncodedFrames.decode`: nvJPEG on a GPU, libjpeg-turbo on the
CPU, the same pixels as the workers' decoder).
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import numpy as np
import torch

from stages.data.errors import PipelineError
from stages.data.frame_cache import FrameCache
from stages.data.sampling import eval_indices, train_indices


class FrameSource(Protocol):
    """Where frames come from: the frame cache, or anything that reads uint8 frames of a video the same way."""

    def num_frames(self, video_id: str) -> int:
        """Number of stored frames of a video."""

    def frame_shape(self, video_id: str) -> tuple[int, ...]:
        """The shape of one frame, (S, S, 3)."""

    def read_into(self, video_id: str, indices: np.ndarray, out: np.ndarray) -> None:
        """Frames `indices` of a video into `out` (uint8 [len(indices), S, S, 3])."""


@dataclass
class EncodedFrames:
    """A batch of JPEG-coded frames [B, nf] as the workers ship them, decoded where the model runs (`decode`)."""

    data: torch.Tensor  # uint8 [total bytes]: every frame's JPEG bytes, video-major
    offsets: torch.Tensor  # int64 [B * nf + 1]: frame k is data[offsets[k] : offsets[k + 1]]
    shape: tuple[int, ...]  # (B, nf, S, S, 3) of the decoded batch

    @classmethod
    def from_frames(cls, frames: Sequence[bytes], frame_shape: tuple[int, ...]) -> EncodedFrames:
        """One video's compressed frames."""
        lengths = torch.tensor([0, *(len(frame) for frame in frames)], dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(frames)), dtype=torch.uint8)
        return cls(data, lengths.cumsum(0), (1, len(frames), *frame_shape))

    @classmethod
    def cat(cls, items: Sequence[EncodedFrames]) -> EncodedFrames:
        """Videos one after the other (a batch)."""
        starts = torch.tensor([0, *(len(item.data) for item in items)]).cumsum(0)
        shifted = [item.offsets[1:] + start for item, start in zip(items, starts[:-1], strict=True)]
        offsets = torch.cat([items[0].offsets[:1], *shifted])
        shape = (sum(item.shape[0] for item in items), *items[0].shape[1:])
        return cls(torch.cat([item.data for item in items]), offsets, shape)

    def pin_memory(self) -> EncodedFrames:
        """The bytes in pinned memory (what DataLoader's `pin_memory=True` calls)."""
        return EncodedFrames(self.data.pin_memory(), self.offsets, self.shape)

    def decode(self, device: torch.device) -> torch.Tensor:
        """uint8 [B, nf, S, S, 3] on `device` (torchvision's `decode_jpeg`: nvJPEG on CUDA, batched)."""
        from torchvision.io import decode_jpeg

        bounds = self.offsets.tolist()
        frames = [self.data[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        decoded = decode_jpeg(frames, device=device)
        return torch.stack(decoded).movedim(1, -1).reshape(self.shape)


@dataclass(frozen=True)
class BatchSlot:
    """A batch decoded into slot `slot` of `FrameDataset.share_batches` (its first `size` rows)."""

    slot: int
    size: int


class SharedBatches:
    """A fixed set of shared-memory batch slots that workers decode into and the training process gives back.

    Made before the workers start (they inherit it with the dataset). A worker waits for a free slot (at most
    `timeout` seconds: a consumer that never gives batches back is an error, not a hang).
    """

    def __init__(self, slots: int, batch_shape: tuple[int, ...], timeout: float = 600.0) -> None:
        self.frames = torch.empty((slots, *batch_shape), dtype=torch.uint8).share_memory_()
        self.timeout = timeout
        self._free: multiprocessing.Queue = multiprocessing.Queue()
        self.reset()

    def reset(self) -> None:
        """Every slot free again (when no worker holds one, e.g. before an epoch's DataLoader starts)."""
        while True:
            try:
                self._free.get(timeout=0.05)
            except queue.Empty:
                break
        for slot in range(len(self.frames)):
            self._free.put(slot)

    def acquire(self) -> int:
        """A free slot (waits for one)."""
        try:
            return self._free.get(timeout=self.timeout)
        except queue.Empty:
            raise PipelineError(
                f"no shared batch slot came back within {self.timeout:g} s: give every batch back "
                "(FrameDataset.give_back) once it is used, and use at least 2 x workers + 2 slots"
            ) from None

    def release(self, slot: int) -> None:
        """Slot `slot` may be decoded into again."""
        self._free.put(slot)


Frames: TypeAlias = "torch.Tensor | EncodedFrames | BatchSlot"  # what an item (or a collated batch) carries


class FrameDataset(torch.utils.data.Dataset):
    """Item `index`: (uint8 tensor [nf, S, S, 3] of video `video_ids[index]`, or its `EncodedFrames`; index)."""

    def __init__(
        self,
        cache: FrameSource | str | Path,
        video_ids: Sequence[str],
        nf: int,
        train: bool,
        tail_fix: bool = False,
        seed: int = 0,
        encoded: bool = False,
    ) -> None:
        if nf < 1:
            raise ValueError(f"nf must be >= 1, got {nf}")
        self.cache = FrameCache(cache) if isinstance(cache, (str, Path)) else cache
        self.video_ids = list(video_ids)
        self.nf = nf
        self.train = train
        self.tail_fix = tail_fix
        self.seed = seed
        self.encoded = encoded
        self.epoch = 0
        self.shared: SharedBatches | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random offsets training items use (and free every shared batch slot)."""
        self.epoch = epoch
        if self.shared is not None:
            self.shared.reset()

    def share_batches(self, batch_size: int, slots: int) -> None:
        """Decode batches into `slots` reused shared-memory slots of `batch_size` videos (see the module docstring)."""
        if self.encoded:
            raise ValueError("encoded items carry compressed bytes, not frames: nothing to share")
        shape = (batch_size, self.nf, *self.cache.frame_shape(self.video_ids[0]))
        self.shared = SharedBatches(slots, shape)

    def take(self, batch: Frames) -> torch.Tensor | EncodedFrames:
        """The frames of a collated batch: a shared slot's rows (valid until `give_back`), else the batch itself."""
        return self.shared.frames[batch.slot, : batch.size] if isinstance(batch, BatchSlot) else batch

    def give_back(self, batch: Frames) -> None:
        """Done with a batch from `take`: its slot may be reused."""
        if isinstance(batch, BatchSlot):
            self.shared.release(batch.slot)

    def __len__(self) -> int:
        return len(self.video_ids)

    def indices(self, index: int) -> np.ndarray:
        """The frame indices item `index` reads in the current epoch."""
        num_frames = self.cache.num_frames(self.video_ids[index])
        if not self.train:
            return eval_indices(num_frames, self.nf, self.tail_fix)
        rng = np.random.RandomState([self.seed, self.epoch, index])
        return train_indices(num_frames, self.nf, rng, self.tail_fix)

    def __getitem__(self, index: int) -> tuple[Frames, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Frames, int]]:
        """The items of one batch; decoded frames are rows of one batch tensor (see `collate_frames`)."""
        if self.encoded:
            return [(self._encoded(index), index) for index in indices]
        if self.shared is not None:
            slot = self.shared.acquire()
            batch = self.shared.frames[slot, : len(indices)]
        else:
            batch = _batch_tensor((len(indices), self.nf, *self.cache.frame_shape(self.video_ids[indices[0]])))
        for row, index in enumerate(indices):
            self.cache.read_into(self.video_ids[index], self.indices(index), batch[row].numpy())
        if self.shared is not None:
            return [(BatchSlot(slot, len(indices)), index) for index in indices]
        return [(frames, index) for frames, index in zip(batch, indices, strict=True)]

    def _encoded(self, index: int) -> EncodedFrames:
        video_id = self.video_ids[index]
        frames = self.cache.read_encoded(video_id, self.indices(index))
        return EncodedFrames.from_frames(frames, self.cache.frame_shape(video_id))


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor, allocated in shared memory inside a DataLoader worker (as the default collate
    does), so that sending it to the training process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def stack_frames(frames: Sequence[Frames]) -> Frames:
    """Items' frames as one batch: the batch tensor itself when they are its rows in order (no copy), else stacked
    (a shared slot and compressed frames stay what they are)."""
    if isinstance(frames[0], BatchSlot):
        return frames[0]
    if isinstance(frames[0], EncodedFrames):
        return EncodedFrames.cat(frames)
    base = frames[0]._base
    if (
        base is not None
        and base.shape[0] == len(frames)
        and base.is_contiguous()
        and all(f._base is base and f.data_ptr() == base[row].data_ptr() for row, f in enumerate(frames))
    ):
        return base
    return torch.stack(frames)


def collate_frames(items: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
    """(frames [B, nf, S, S, 3], `BatchSlot` or `EncodedFrames`; item indices [B]): the collate of `FrameDataset`."""
    return stack_frames([frames for frames, _ in items]), torch.tensor([index for _, index in items])
