"""The unit store of a search index: every video's units in one fp16 matrix, read memory-mapped.

Layout (`INDEX_DIR/store/`, rebuilt by `index` when videos change, swapped in with one directory rename):

    meta.json       counts, unit dimension, largest unit norm, whether packed tensors exist
    videos.jsonl    one `VideoRecord` per video, in store order
    units.npy       fp16 [N_units, D] every video's units (events, clips, proposals, prototypes, frames), video by video
    windows.npy     float32 [N_units, 2] each unit's [start, end] in seconds
    thumbs.npy      int32 [N_units] the frame whose JPEG is each unit's thumbnail (`thumbs/<key>/<frame>.jpg`)
    offsets.npy     int64 [N_videos + 1] first unit of each video (video v owns units offsets[v]:offsets[v + 1])
    packed.npy      fp16 [N_videos, K, D] the model's own per-video tensor, for models with their own score
    ann.faiss       the approximate index over the units (above `AnnConfig.min_units`)

Arrays are `.npy` files opened with `mmap_mode="r"`: a search touches only the pages it reads, so a store larger
than memory works (exact search streams it; approximate search reads the candidates' units only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.errors import PipelineError
from stages.data.files import atomic_write_text
from stages.data.frame_cache import publish_video

STORE_FORMAT = 1


@dataclass(frozen=True)
class VideoRecord:
    """One indexed video: where it is, what it was, and its place in the index."""

    video_id: str  # the relative path without its extension (or with it, when two files share a stem)
    path: str  # relative to the indexed folder (posix)
    key: str  # file-system-safe name of the video's entries (frame cache, thumbnails, vectors)
    fingerprint: dict[str, Any]  # size, mtime_ns and sha256 of the file that was indexed
    duration: float  # seconds
    frames: int  # frames in the frame cache
    units: int  # units stored

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able mapping that `from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoRecord:
        """Inverse of `to_dict`."""
        return cls(**data)


class StoreWriter:
    """Writes a store of known size under a staging folder, video by video; `publish` moves it into place.

    Args:
        directory: the final store folder (replaced by `publish`).
        num_units: total units of all videos.
        num_videos: number of videos.
        dim: unit dimension.
        packed_shape: (K, D) of each video's packed tensor, or None for models scored on their units.
    """

    def __init__(
        self,
        directory: Path,
        num_units: int,
        num_videos: int,
        dim: int,
        packed_shape: tuple[int, int] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.staged = self.directory.with_name(f"{self.directory.name}.{uuid.uuid4().hex[:8]}.partial")
        self.staged.mkdir(parents=True)
        self.units = np.lib.format.open_memmap(self.staged / "units.npy", "w+", np.float16, (num_units, dim))
        self.windows = np.lib.format.open_memmap(self.staged / "windows.npy", "w+", np.float32, (num_units, 2))
        self.thumbs = np.lib.format.open_memmap(self.staged / "thumbs.npy", "w+", np.int32, (num_units,))
        self.packed = None
        if packed_shape is not None:
            shape = (num_videos, *packed_shape)
            self.packed = np.lib.format.open_memmap(self.staged / "packed.npy", "w+", np.float16, shape)
        self.offsets = np.zeros(num_videos + 1, np.int64)
        self.records: list[VideoRecord] = []
        self.max_norm = 0.0

    def add(
        self,
        records: list[VideoRecord],
        units: np.ndarray,
        windows: np.ndarray,
        thumbs: np.ndarray,
        packed: np.ndarray | None = None,
    ) -> None:
        """Append videos: their units [U, D] (fp16, video after video; `record.units` each), windows [U, 2] (seconds),
        thumbnail frames [U] and, for models with their own score, packed tensors [len(records), K, D]."""
        first = len(self.records)
        lengths = np.array([record.units for record in records], dtype=np.int64)
        start = self.offsets[first]
        end = start + int(lengths.sum())
        if end > len(self.units) or first + len(records) > len(self.offsets) - 1 or len(units) != end - start:
            raise ValueError(f"the store was sized for {len(self.units)} units of {len(self.offsets) - 1} videos")
        self.units[start:end] = units
        self.windows[start:end] = windows
        self.thumbs[start:end] = thumbs
        if self.packed is not None:
            self.packed[first : first + len(records)] = packed
        self.offsets[first + 1 : first + len(records) + 1] = start + np.cumsum(lengths)
        self.records += records
        if len(units):
            norms = np.linalg.norm(np.asarray(units, dtype=np.float32), axis=1)
            self.max_norm = max(self.max_norm, float(norms.max()))

    def finish(self, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the offsets, records and metadata; return the staging folder (complete, not yet published)."""
        if len(self.records) != len(self.offsets) - 1 or self.offsets[-1] != len(self.units):
            raise ValueError(f"{len(self.records)} videos and {self.offsets[-1]} units added, store sized otherwise")
        for array in (self.units, self.windows, self.thumbs, self.packed):
            if array is not None:
                array.flush()
        np.save(self.staged / "offsets.npy", self.offsets)
        lines = "".join(json.dumps(record.to_dict()) + "\n" for record in self.records)
        atomic_write_text(self.staged / "videos.jsonl", lines)
        meta = {
            "format": STORE_FORMAT,
            "videos": len(self.records),
            "units": int(self.offsets[-1]),
            "dim": int(self.units.shape[1]),
            "max_norm": self.max_norm,
            "packed": None if self.packed is None else list(self.packed.shape[1:]),
            **(extra_meta or {}),
        }
        atomic_write_text(self.staged / "meta.json", json.dumps(meta, indent=1))
        return self.staged

    def publish(self) -> Path:
        """Move the finished store into place with directory renames (replacing an older store)."""
        publish_video(self.staged, self.directory.parent, self.directory.name)  # the frame cache's directory swap
        return self.directory


def remove_partial_stores(directory: Path) -> None:
    """Delete staging folders left by a run killed while it wrote a store."""
    for stale in directory.parent.glob(f"{directory.name}.*.partial*"):
        shutil.rmtree(stale, ignore_errors=True)


@dataclass
class UnitStore:
    """An opened store: memory-mapped arrays and the video records."""

    directory: Path
    meta: dict[str, Any]
    videos: list[VideoRecord]
    units: np.ndarray  # fp16 [N_units, D] (memory-mapped)
    windows: np.ndarray  # float32 [N_units, 2]
    thumbs: np.ndarray  # int32 [N_units]
    offsets: np.ndarray  # int64 [N_videos + 1]
    packed: np.ndarray | None  # fp16 [N_videos, K, D] (memory-mapped)

    @classmethod
    def open(cls, directory: str | Path) -> UnitStore:
        """Open the store written by `StoreWriter` at `directory`."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise PipelineError(f"{directory} holds no search store; run `python pipeline.py index` first")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != STORE_FORMAT:
            raise PipelineError(f"{directory} is a store of format {meta.get('format')}, expected {STORE_FORMAT}")
        lines = (directory / "videos.jsonl").read_text().splitlines()
        packed_path = directory / "packed.npy"
        return cls(
            directory=directory,
            meta=meta,
            videos=[VideoRecord.from_dict(json.loads(line)) for line in lines],
            units=np.load(directory / "units.npy", mmap_mode="r"),
            windows=np.load(directory / "windows.npy", mmap_mode="r"),
            thumbs=np.load(directory / "thumbs.npy", mmap_mode="r"),
            offsets=np.load(directory / "offsets.npy"),
            packed=np.load(packed_path, mmap_mode="r") if packed_path.is_file() else None,
        )

    @property
    def num_videos(self) -> int:
        """Number of videos."""
        return len(self.offsets) - 1

    @property
    def num_units(self) -> int:
        """Number of units of all videos."""
        return int(self.offsets[-1])

    def video_of_units(self, units: np.ndarray) -> np.ndarray:
        """The video index of each unit index."""
        return np.searchsorted(self.offsets, units, side="right") - 1

    def lengths(self, videos: np.ndarray) -> np.ndarray:
        """Units of each of `videos`."""
        return self.offsets[videos + 1] - self.offsets[videos]

    def unit_indices(self, videos: np.ndarray) -> np.ndarray:
        """The store indices of every unit of `videos`, video by video."""
        starts = self.offsets[videos]
        lengths = self.lengths(videos)
        shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return shift + np.arange(int(lengths.sum()))

    def read_units(self, videos: np.ndarray) -> np.ndarray:
        """fp16 [sum of lengths, D] every unit of `videos`, video by video (a copy).

        The videos' byte ranges are first handed to the kernel together (`posix_fadvise` WILLNEED), so that videos
        scattered over a store larger than memory are read from disk in parallel, not one page fault at a time.
        """
        if isinstance(self.units, np.memmap) and hasattr(os, "posix_fadvise"):
            row = self.units.shape[1] * self.units.itemsize
            fd = os.open(self.units.filename, os.O_RDONLY)
            try:
                for start, count in zip(self.offsets[videos], self.lengths(videos), strict=True):
                    os.posix_fadvise(fd, self.units.offset + int(start) * row, int(count) * row, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        return np.asarray(self.units[self.unit_indices(videos)])
