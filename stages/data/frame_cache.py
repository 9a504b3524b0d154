"""The zarr v3 frame cache: one uint8 array [T, S, S, 3] per video, one frame per inner chunk, one shard per video.

Layout (`cache/<dataset>/frames.zarr`, a plain zarr v3 group readable by zarr-python and tensorstore):

    frames.zarr/zarr.json                 group metadata
    frames.zarr/<video_id>/zarr.json      array metadata and provenance attributes
    frames.zarr/<video_id>/c/0/0/0/0      the shard: every frame of the video

A video is written as a standalone array under `frames.zarr.partial/` and then moved into the group with one
directory rename, so an array inside the group is always complete. JPEG arrays use the `prvr_jpeg` codec defined
here (zarr-python reads them once this module is imported; tensorstore does not know the codec).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import google_crc32c
import numpy as np
import zarr
from numcodecs.zstd import Zstd
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer

from stages.data.errors import PipelineError


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Lossy zarr v3 serializer: each chunk [..., H, W, 3] uint8 is one baseline JPEG (Pillow, 4:2:0).

    Registered as `prvr_jpeg`: zarr-python reads such arrays once this module is imported.
    """

    is_fixed_size = False
    quality: int = 90

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JpegCodec:
        """Parse `{"name": "prvr_jpeg", "configuration": {"quality": q}}`."""
        return cls(**(data.get("configuration") or {}))

    def to_dict(self) -> dict[str, Any]:
        """The codec's zarr.json entry."""
        return {"name": "prvr_jpeg", "configuration": {"quality": self.quality}}

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        pixels = _jpeg_decode(chunk_bytes.to_bytes(), chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(pixels)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = _jpeg_encode(np.asarray(chunk_array.as_ndarray_like()), self.quality)
        return chunk_spec.prototype.buffer.from_bytes(data)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        """Unknown in advance (variable size)."""
        raise NotImplementedError


zarr.registry.register_codec("prvr_jpeg", JpegCodec)


def _jpeg_encode(pixels: np.ndarray, quality: int) -> bytes:
    """One baseline JPEG of uint8 [..., H, W, 3] (leading axes stacked vertically)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels.reshape(-1, *pixels.shape[-2:])).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _jpeg_decode(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `_jpeg_encode`."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(shape)


@dataclass(frozen=True)
class FrameStorage:
    """How frames are stored: lossless zstd, or lossy JPEG."""

    codec: Literal["zstd", "jpeg"] = "zstd"
    zstd_level: int = 3  # zstd compression level (1-22); frames compress only 1.0-1.7x losslessly
    jpeg_quality: int = 90  # JPEG quality (1-100), used when codec is jpeg

    def describe(self) -> dict[str, Any]:
        """The settings that change stored bytes (recorded in each array's attributes)."""
        if self.codec == "jpeg":
            return {"name": "jpeg", "quality": self.jpeg_quality}
        return {"name": "zstd", "level": self.zstd_level}


def staging_dir(cache_path: str | Path) -> Path:
    """Where arrays are written before they are moved into the cache (`frames.zarr.partial`)."""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".partial")


def ensure_cache(cache_path: str | Path) -> None:
    """Create the cache group if needed and remove arrays left half-written by an interrupted run."""
    zarr.open_group(str(cache_path), mode="a", zarr_format=3)
    shutil.rmtree(staging_dir(cache_path), ignore_errors=True)


def new_staging_path(cache_path: str | Path, video_id: str) -> Path:
    """A fresh directory name under the staging folder for one write of `video_id`."""
    return staging_dir(cache_path) / f"{video_id}.{uuid.uuid4().hex}"


def write_video(staged: Path, frames: np.ndarray, attributes: dict[str, Any], storage: FrameStorage) -> Path:
    """Write frames uint8 [T, S, S, 3] as a standalone zarr v3 array at `staged` (a new directory); returns it.

    zarr-python writes the metadata; the shard itself is assembled here as the sharding spec lays it out (encoded
    frames, then the (offset, nbytes) index and its crc32c), which is 2-3x faster than zarr-python's per-chunk
    pipeline. The array is invisible to readers until `publish_video` moves it into the cache.
    """
    staged.parent.mkdir(parents=True, exist_ok=True)
    jpeg = storage.codec == "jpeg"
    zarr.create_array(
        store=str(staged),
        shape=frames.shape,
        dtype="uint8",
        chunks=(1, *frames.shape[1:]),
        shards=frames.shape,
        serializer=JpegCodec(quality=storage.jpeg_quality) if jpeg else "auto",
        compressors=None if jpeg else [zarr.codecs.ZstdCodec(level=storage.zstd_level)],
        fill_value=0,
        dimension_names=("t", "h", "w", "c"),
        attributes=attributes,
        zarr_format=3,
    )
    encode = partial(_jpeg_encode, quality=storage.jpeg_quality) if jpeg else Zstd(storage.zstd_level).encode
    encoded = [encode(np.ascontiguousarray(frame)) for frame in frames]
    lengths = np.array([len(data) for data in encoded], dtype="<u8")
    index = np.stack([np.cumsum(lengths) - lengths, lengths], axis=1).astype("<u8").tobytes()
    shard = _shard_path(staged, frames.ndim)
    shard.parent.mkdir(parents=True, exist_ok=True)
    with open(shard, "wb") as handle:
        handle.writelines([*encoded, index, np.uint32(google_crc32c.value(index)).astype("<u4").tobytes()])
    if not _ShardReader.for_array(staged, json.loads((staged / "zarr.json").read_text())):
        raise RuntimeError(f"zarr wrote a layout this module does not know: {staged / 'zarr.json'}")
    return staged


def _shard_path(directory: Path, ndim: int) -> Path:
    """The only shard of a one-shard array (default chunk key encoding)."""
    return directory.joinpath("c", *["0"] * ndim)


def publish_video(staged: Path, cache_path: str | Path, video_id: str) -> None:
    """Move a staged array into the cache with a directory rename, replacing an older version of the video."""
    target = Path(cache_path) / video_id
    if target.exists():
        retired = staged.with_name(staged.name + ".old")
        os.rename(target, retired)
        os.rename(staged, target)
        shutil.rmtree(retired)
    else:
        os.rename(staged, target)


class FrameCache:
    """Reader of the frame cache. Holds no open file or thread, so it pickles and survives fork (DataLoader workers).

    Each video's frame count and shard layout are cached on first use (about 200 bytes, so a reader of a 100K-video
    cache stays small; the attributes are read from disk when asked): open a new reader after the cache was rewritten.

    Frames are read straight from each video's shard file as the zarr v3 sharding spec lays it out: one `pread` of
    the shard index, one `pread` and one zstd or JPEG decode per wanted frame. This is about as fast as tensorstore
    and much faster than zarr-python's per-chunk path, and unlike tensorstore (which aborts any process forked after
    it started its threads) it is fork-safe. Arrays with other layouts are read with zarr-python.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._layouts: dict[str, tuple[int, _ShardReader | None]] = {}  # video -> (frames, shard reader or None)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"FrameCache({str(self.path)!r})"

    def video_ids(self) -> list[str]:
        """Ids of the complete videos, sorted."""
        if not self.path.is_dir():
            return []
        return sorted(
            entry.name
            for entry in os.scandir(self.path)
            if entry.is_dir() and (Path(entry.path) / "zarr.json").is_file()
        )

    def __contains__(self, video_id: str) -> bool:
        return (self.path / video_id / "zarr.json").is_file()

    def num_frames(self, video_id: str) -> int:
        """Number of cached frames of a video."""
        return self._layout(video_id)[0]

    def attrs(self, video_id: str) -> dict:
        """Provenance attributes of a video (fps, source fingerprint, decoder, resize policy, codec, ...)."""
        return dict(self._meta(video_id).get("attributes", {}))

    def read(self, video_id: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Frames `indices` (any order, repeats allowed; None = all) of a video as uint8 [n, S, S, 3]."""
        total, shard = self._layout(video_id)
        wanted = np.arange(total) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= total):
            raise IndexError(f"frame indices {wanted.tolist()} out of range [0, {total}) for video {video_id!r}")
        unique, inverse = np.unique(wanted, return_inverse=True)
        if shard is not None:
            frames = shard.read(unique)
        else:
            array = zarr.open_array(str(self.path / video_id), mode="r")
            frames = np.stack([array[int(i)] for i in unique]) if len(unique) else array[:0]
        if len(unique) == len(wanted) and np.array_equal(unique, wanted):
            return frames
        return frames[inverse]

    def _layout(self, video_id: str) -> tuple[int, _ShardReader | None]:
        layout = self._layouts.get(video_id)
        if layout is None:
            meta = self._meta(video_id)
            shard = _ShardReader.for_array(self.path / video_id, meta)
            layout = self._layouts[video_id] = (int(meta["shape"][0]), shard)
        return layout

    def _meta(self, video_id: str) -> dict[str, Any]:
        path = self.path / video_id / "zarr.json"
        if not path.is_file():
            raise PipelineError(
                f"video {video_id!r} is not in the frame cache {self.path}; run `python pipeline.py decode`"
            )
        return json.loads(path.read_text())


_EMPTY_CHUNK = np.iinfo(np.uint64).max


@dataclass(frozen=True)
class _ShardReader:
    """Reads frames of a one-shard array [T, ...] with one frame per inner chunk (zarr v3 sharding_indexed)."""

    shard_path: Path
    frame_shape: tuple[int, ...]
    num_frames: int
    index_at_end: bool
    codec: str  # "raw", "zstd" or "jpeg"
    fill_value: int

    @classmethod
    def for_array(cls, directory: Path, meta: dict[str, Any]) -> _ShardReader | None:
        """A reader for arrays this writer makes, or None for any other layout (read with zarr-python instead)."""
        shape = meta["shape"]
        codecs = meta.get("codecs", [])
        encoding = meta.get("chunk_key_encoding", {})
        if (
            meta.get("data_type") != "uint8"
            or len(codecs) != 1
            or codecs[0]["name"] != "sharding_indexed"
            or meta["chunk_grid"]["configuration"]["chunk_shape"] != shape
            or encoding.get("name") != "default"
            or (encoding.get("configuration") or {}).get("separator", "/") != "/"
        ):
            return None
        config = codecs[0]["configuration"]
        inner = [codec["name"] for codec in config["codecs"]]
        index_codecs = [codec["name"] for codec in config.get("index_codecs", [])]
        codec = {("bytes",): "raw", ("bytes", "zstd"): "zstd", ("prvr_jpeg",): "jpeg"}.get(tuple(inner))
        if codec is None or config["chunk_shape"] != [1, *shape[1:]] or index_codecs != ["bytes", "crc32c"]:
            return None
        shard = _shard_path(directory, len(shape))
        at_end = config.get("index_location", "end") == "end"
        return cls(shard, tuple(shape[1:]), shape[0], at_end, codec, int(meta.get("fill_value") or 0))

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames at sorted unique `indices`."""
        out = np.empty((len(indices), *self.frame_shape), np.uint8)
        if not len(indices):
            return out
        index_bytes = 16 * self.num_frames
        fd = os.open(self.shard_path, os.O_RDONLY)
        try:
            index_offset = os.fstat(fd).st_size - index_bytes - 4 if self.index_at_end else 0
            index = np.frombuffer(os.pread(fd, index_bytes, index_offset), "<u8").reshape(-1, 2)
            for row, frame in enumerate(indices):
                offset, nbytes = index[frame]
                if offset == _EMPTY_CHUNK:
                    out[row] = self.fill_value
                else:
                    out[row] = self._decode(os.pread(fd, int(nbytes), int(offset)))
        finally:
            os.close(fd)
        return out

    def _decode(self, data: bytes) -> np.ndarray:
        if self.codec == "jpeg":
            return _jpeg_decode(data, self.frame_shape)
        if self.codec == "zstd":
            data = _ZSTD.decode(data)
        return np.frombuffer(data, np.uint8).reshape(self.frame_shape)


_ZSTD = Zstd()
