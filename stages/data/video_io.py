"""Video decoding to fixed-rate, square uint8 frames (PyAV or decord), and a small H.264 writer for tests.

The geometry is the same for every decoder: the short side is resized to `size` (bilinear), then the centre
`size x size` square is cropped, so landscape and portrait videos keep their aspect ratio (the official
`compress_video.py` squashes portrait videos; we do not).

Frames are kept on a grid of ticks k / fps (`RateSampler`). The clips of a merged video (QVHighlights re-split) are
decoded one by one on the grid of the merged timeline (`decode_video(..., offset, duration)`, `tick_range`,
`frames_on_ticks`), so that their frames line up one after the other as if the clips were one file.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

Decoder = Literal["pyav", "decord"]
RESIZE_POLICY = "short side to {size} px (bilinear), centre crop {size}x{size}"
_TICK_EPS = 1e-6  # a frame shown within a microsecond before a tick counts as on it


@dataclass(frozen=True)
class DecodedVideo:
    """Frames kept at the target rate, and what the source looked like."""

    frames: np.ndarray  # uint8 [T, size, size, 3]
    source_frames: int  # frames decoded at the source rate
    source_size: tuple[int, int]  # (width, height)
    duration: float  # seconds, from the first to the last decoded frame's timestamp
    frame_interval: float  # seconds between source frames
    stream_duration: float | None = None  # what the container says, when it says it
    ticks: np.ndarray | None = None  # int64 [T]: the tick k (time k / fps on the timeline) each frame was kept for


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to `size` with the aspect ratio kept."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """The centre `size x size` square of an [H, W, 3] frame whose short side is `size`."""
    top = (frame.shape[0] - size) // 2
    left = (frame.shape[1] - size) // 2
    return frame[top : top + size, left : left + size]


def tick_range(offset: float, duration: float, fps: float) -> tuple[int, int]:
    """The ticks k (times k / fps) in [offset, offset + duration): (first, stop), stop excluded."""
    return math.ceil(offset * fps - _TICK_EPS), math.ceil((offset + duration) * fps - _TICK_EPS)


class RateSampler:
    """Keeps, for every tick k / fps of a timeline, the first frame shown at or after it (fed presentation times in
    order).

    A source slower than `fps` keeps every frame (no duplicates), so a 3 fps source decoded at 3 fps keeps all its
    frames, as the official pipeline does. A clip that plays from `offset` seconds on the timeline (one part of a
    merged video) meets the ticks at its own times k / fps - offset, so consecutive clips continue one grid.
    """

    def __init__(self, fps: float, offset: float = 0.0) -> None:
        self.fps = fps
        self.offset = offset
        self.start: float | None = None
        self.next_tick = tick_range(offset, 0.0, fps)[0]

    def position(self, time: float) -> float:
        """Where the frame shown at `time` seconds (the clip's own clock) falls on the timeline, in ticks."""
        self.start = time if self.start is None else self.start
        return (time - self.start + self.offset) * self.fps + _TICK_EPS

    def tick(self, time: float) -> int | None:
        """The tick the frame shown at `time` seconds is kept for, or None when it is not kept."""
        position = self.position(time)
        if position < self.next_tick:
            return None
        self.next_tick = int(np.floor(position)) + 1
        return self.next_tick - 1

    def keep(self, time: float) -> bool:
        """Whether the frame shown at `time` seconds is kept."""
        return self.tick(time) is not None


def select_frames(times: np.ndarray, fps: float, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the frames kept at `fps` among frames shown at `times` (seconds, non-decreasing), and their ticks."""
    sampler = RateSampler(fps, offset)
    kept = [(i, tick) for i, time in enumerate(times) if (tick := sampler.tick(float(time))) is not None]
    indices, ticks = zip(*kept, strict=True) if kept else ((), ())
    return np.asarray(indices, dtype=np.int64), np.asarray(ticks, dtype=np.int64)


def uniform_cap(num_frames: int, max_frames: int | None) -> np.ndarray:
    """Indices of at most `max_frames` frames spread uniformly over `num_frames` (all when no cap applies)."""
    if max_frames is None or num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, max_frames)).astype(np.int64))


def decode_video(
    path: str | Path,
    fps: float,
    size: int,
    decoder: Decoder = "pyav",
    offset: float = 0.0,
    duration: float | None = None,
) -> DecodedVideo:
    """Decode `path` at `fps` into uint8 [T, size, size, 3]; raises ValueError when no frame can be decoded.

    A clip of a merged video plays `duration` seconds from `offset` on the timeline: its frames are kept on the
    timeline's ticks (see `RateSampler`), none past its `duration`, and it must last that long.
    """
    stop = None if duration is None else tick_range(offset, duration, fps)[1]
    read = _decode_pyav if decoder == "pyav" else _decode_decord
    decoded = read(Path(path), fps, size, offset, stop)
    if not len(decoded.frames):
        raise ValueError("no frame could be decoded")
    expected = decoded.stream_duration if duration is None else duration
    if expected and expected - decoded.duration - decoded.frame_interval > max(0.5, 0.02 * expected):
        raise ValueError(f"truncated or damaged: decoded {decoded.duration:.2f} s of {expected:.2f} s")
    return decoded


def frames_on_ticks(decoded: DecodedVideo, first: int, stop: int) -> np.ndarray:
    """The frames of ticks first..stop-1, each the latest decoded frame kept at or before its tick (the first frame
    for ticks before it): a clip that ends a frame short of its duration, or is slower than the rate, repeats one."""
    ticks = decoded.ticks if decoded.ticks is not None else np.arange(len(decoded.frames))
    positions = np.searchsorted(ticks, np.arange(first, stop), side="right") - 1
    return decoded.frames[np.clip(positions, 0, None)]


def decoder_version(decoder: Decoder) -> str:
    """`name version` of a decoder, for provenance attributes."""
    if decoder == "pyav":
        import av

        return f"pyav {av.__version__} (ffmpeg {av.ffmpeg_version_info})"
    import decord

    return f"decord {decord.__version__}"


def _decode_pyav(path: Path, fps: float, size: int, offset: float, stop: int | None) -> DecodedVideo:
    import av

    frames: list[np.ndarray] = []
    ticks: list[int] = []
    sampler = RateSampler(fps, offset)
    count = width = height = 0
    time = 0.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        stream_duration = float(stream.duration * stream.time_base) if stream.duration else None
        for frame in container.decode(stream):
            time = float(frame.time) if frame.time is not None else count / rate
            if stop is not None and sampler.position(time) >= stop:
                break  # the next clip's ticks
            count += 1
            tick = sampler.tick(time)
            if tick is None:
                continue
            width, height = frame.width, frame.height
            new_w, new_h = resized_shape(width, height, size)
            rgb = frame.to_ndarray(width=new_w, height=new_h, format="rgb24", interpolation="BILINEAR")
            frames.append(np.ascontiguousarray(center_crop(rgb, size)))
            ticks.append(tick)
    stacked = np.stack(frames) if frames else np.zeros((0, size, size, 3), np.uint8)
    duration = time - (sampler.start or 0.0)
    return DecodedVideo(
        stacked, count, (width, height), duration, 1 / rate, stream_duration, np.asarray(ticks, np.int64)
    )


def _decode_decord(path: Path, fps: float, size: int, offset: float, stop: int | None) -> DecodedVideo:
    """decord at native resolution, resized with Pillow: decord's own resize fails for some output sizes."""
    import decord
    from PIL import Image

    reader = decord.VideoReader(str(path), num_threads=1)
    times = reader.get_frame_timestamp(range(len(reader)))[:, 0]
    if stop is not None:
        times = times[(times - times[0] + offset) * fps + _TICK_EPS < stop]
    indices, ticks = select_frames(times, fps, offset)
    batch = reader.get_batch(indices.tolist()).asnumpy()
    height, width = batch.shape[1:3]
    new_shape = resized_shape(width, height, size)
    frames = [center_crop(np.asarray(Image.fromarray(f).resize(new_shape, Image.BILINEAR)), size) for f in batch]
    stacked = np.stack(frames) if frames else np.zeros((0, size, size, 3), np.uint8)
    interval = 1 / (reader.get_avg_fps() or 25)
    duration = float(times[-1] - times[0]) if len(times) else 0.0
    return DecodedVideo(stacked, len(times), (width, height), duration, interval, ticks=ticks)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    crf: int = 23,
    preset: str = "veryfast",
    comment: str | None = None,
) -> Path:
    """Encode uint8 RGB frames [H, W, 3] (H, W even) as an H.264 mp4 with PyAV, one encoder thread (deterministic).

    The file is written under a temporary name and renamed, so an interrupted write leaves no partial mp4;
    `comment` goes into the container's metadata.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    frames = iter(frames)
    first = next(frames)
    with av.open(str(tmp), "w", format="mp4") as container:
        if comment is not None:
            container.metadata["comment"] = comment
        stream = container.add_stream(
            "libx264",
            rate=Fraction(fps).limit_denominator(1001),
            options={"crf": str(crf), "preset": preset, "threads": "1"},
        )
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in itertools.chain([first], frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)
    return path
