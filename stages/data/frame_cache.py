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

import contextlib
import io
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import google_crc32c
import numpy as np
import simplejpeg
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


def _jpeg_decode(data: bytes | memoryview, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `_jpeg_encode` (into `out` if given): libjpeg-turbo's accurate integer IDCT and fancy upsampling,
    the same pixels as Pillow's decoder (tests/test_frame_cache.py)."""
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    if pixels.size != int(np.prod(shape)):
        raise PipelineError(f"a JPEG frame decodes to {pixels.shape}, expected {shape}; the frame cache is damaged")
    return pixels.reshape(shape)


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
    the shard index, one read per run of consecutive wanted frames, and each frame decoded (zstd or JPEG) straight
    into the caller's array (`read_into`: e.g. a batch in shared memory, so nothing is copied again). This is faster
    than tensorstore here and much faster than zarr-python's per-chunk path, and unlike tensorstore (which aborts
    any process forked after it started its threads) it is fork-safe. Arrays with other layouts are read with
    zarr-python.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # video -> (frame count, frame shape, shard reader or None): about 200 bytes a video
        self._layouts: dict[str, tuple[int, tuple[int, ...], _ShardReader | None]] = {}
        self._local = threading.local()  # each thread's read buffer

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

    def frame_shape(self, video_id: str) -> tuple[int, ...]:
        """The shape of one frame, (S, S, 3)."""
        return self._layout(video_id)[1]

    def codec(self, video_id: str) -> str:
        """How the video's frames are stored: `zstd`, `jpeg`, `raw`, or `other` (read through zarr-python)."""
        shard = self._shard(video_id)
        return "other" if shard is None else shard.codec

    def read(self, video_id: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Frames `indices` (any order, repeats allowed; None = all) of a video as uint8 [n, S, S, 3]."""
        wanted = self._indices(video_id, indices)
        out = np.empty((len(wanted), *self.frame_shape(video_id)), np.uint8)
        self.read_into(video_id, wanted, out)
        return out

    def read_into(self, video_id: str, indices: Sequence[int] | np.ndarray | None, out: np.ndarray) -> None:
        """`read` into `out` (uint8 [n, S, S, 3], C-contiguous), e.g. one item's rows of a shared-memory batch."""
        wanted = self._indices(video_id, indices)
        unique, inverse = np.unique(wanted, return_inverse=True)
        in_order = len(unique) == len(wanted) and np.array_equal(unique, wanted)
        target = out if in_order else np.empty((len(unique), *out.shape[1:]), np.uint8)
        shard = self._shard(video_id)
        if shard is not None:
            shard.read_into(unique, target, self._buffer)
        elif len(unique):
            array = zarr.open_array(str(self.path / video_id), mode="r")
            for row, frame in enumerate(unique):
                target[row] = array[int(frame)]
        if not in_order:
            out[...] = target[inverse]

    def read_encoded(self, video_id: str, indices: Sequence[int] | np.ndarray) -> list[bytes]:
        """The stored (JPEG) bytes of frames `indices` of a JPEG-coded video, to be decoded elsewhere (a GPU)."""
        shard = self._shard(video_id)
        if shard is None or shard.codec != "jpeg":
            raise PipelineError(
                f"video {video_id!r} of {self.path} is not JPEG-coded; decode with codec=jpeg to ship encoded frames"
            )
        wanted = self._indices(video_id, indices)
        unique, inverse = np.unique(wanted, return_inverse=True)
        frames = shard.read_encoded(unique)
        return [frames[i] for i in inverse]

    def _indices(self, video_id: str, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
        total = self.num_frames(video_id)
        wanted = np.arange(total) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= total):
            raise IndexError(f"frame indices {wanted.tolist()} out of range [0, {total}) for video {video_id!r}")
        return wanted

    def _shard(self, video_id: str) -> _ShardReader | None:
        return self._layout(video_id)[2]

    def _buffer(self, nbytes: int) -> memoryview:
        """This thread's read buffer, at least `nbytes` long (grown as needed, reused between reads)."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < nbytes:
            buffer = self._local.buffer = bytearray(max(nbytes, 1 << 20))
        return memoryview(buffer)[:nbytes]

    def _layout(self, video_id: str) -> tuple[int, tuple[int, ...], _ShardReader | None]:
        layout = self._layouts.get(video_id)
        if layout is None:
            meta = self._meta(video_id)
            shard = _ShardReader.for_array(self.path / video_id, meta)
            layout = self._layouts[video_id] = (int(meta["shape"][0]), tuple(meta["shape"][1:]), shard)
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

    def read_into(self, indices: np.ndarray, out: np.ndarray, buffer: Callable[[int], memoryview]) -> None:
        """Frames at sorted unique `indices` into `out` [len(indices), *frame_shape]: one read per run of consecutive
        frames (stored one after the other), straight into `out` (raw) or into `buffer(n)` and decoded into `out`."""
        if not len(indices):
            return
        with self._open() as fd:
            index = self._index(fd)
            for start, stop in _runs(indices, index):
                first, rows = int(index[indices[start], 0]), range(start, stop)
                if first == _EMPTY_CHUNK:
                    out[start:stop] = self.fill_value
                    continue
                nbytes = [int(index[indices[row], 1]) for row in rows]
                if self.codec == "raw":
                    _read_exactly(fd, [out[row].reshape(-1) for row in rows], first, self.shard_path)
                    continue
                data = buffer(sum(nbytes))
                _read_exactly(fd, [data], first, self.shard_path)
                ends = np.cumsum(nbytes)
                for row, end, size in zip(rows, ends, nbytes, strict=True):
                    self._decode_into(data[end - size : end], out[row])

    def read_encoded(self, indices: np.ndarray) -> list[bytes]:
        """The stored bytes of the frames at sorted unique `indices`."""
        with self._open() as fd:
            index = self._index(fd)
            frames = []
            for frame in indices:
                offset, nbytes = (int(v) for v in index[frame])
                if offset == _EMPTY_CHUNK:
                    raise PipelineError(f"frame {frame} of {self.shard_path} was never written; decode the video again")
                frames.append(os.pread(fd, nbytes, offset))
        return frames

    @contextlib.contextmanager
    def _open(self) -> Iterator[int]:
        fd = os.open(self.shard_path, os.O_RDONLY)
        try:
            yield fd
        finally:
            os.close(fd)

    def _index(self, fd: int) -> np.ndarray:
        """The shard index: (offset, nbytes) of every frame."""
        index_bytes = 16 * self.num_frames
        index_offset = os.fstat(fd).st_size - index_bytes - 4 if self.index_at_end else 0
        return np.frombuffer(os.pread(fd, index_bytes, index_offset), "<u8").reshape(-1, 2)

    def _decode_into(self, data: memoryview, out: np.ndarray) -> None:
        if self.codec == "jpeg":
            _jpeg_decode(data, self.frame_shape, out)
        else:
            _ZSTD.decode(data, out=out)


def _runs(indices: np.ndarray, index: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) ranges of `indices` whose frames are stored back to back (and empty chunks, one by one)."""
    offsets, sizes = index[indices, 0], index[indices, 1]
    follows = (np.diff(indices) == 1) & (offsets[1:] == offsets[:-1] + sizes[:-1]) & (offsets[1:] != _EMPTY_CHUNK)
    starts = [0, *(np.flatnonzero(~follows) + 1).tolist()]
    return list(zip(starts, [*starts[1:], len(indices)], strict=True))


def _read_exactly(fd: int, buffers: list[Any], offset: int, path: Path) -> None:
    """Fill `buffers` from `offset` of the file (one `preadv`); a short read means a truncated shard."""
    expected = sum(memoryview(b).nbytes for b in buffers)
    if os.preadv(fd, buffers, offset) != expected:
        raise PipelineError(f"{path} is shorter than its index says; decode the video again")


_ZSTD = Zstd()
