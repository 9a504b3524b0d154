"""Small real H.264 test videos made with PyAV, and annotations that reference them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.data.schema import Query, write_queries
from stages.data.video_io import write_video


def moving_frames(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: a coloured background with a bright bar sliding left to right, plus noise."""
    rng = np.random.default_rng(seed)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = rng.integers(30, 200, size=3, dtype=np.uint8)
    for t in range(num_frames):
        left = (t * 7) % max(1, width - 8)
        frames[t, :, left : left + 8] = 250
    noise = rng.integers(-8, 9, size=frames.shape)
    return np.clip(frames.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_video(path: Path, seconds: float, fps: float = 10, width: int = 96, height: int = 64, seed: int = 0) -> Path:
    """Write a short mp4 of `seconds` seconds at `fps`."""
    return write_video(path, moving_frames(max(1, round(seconds * fps)), width, height, seed), fps)


def write_annotations(path: Path, video_ids: list[str]) -> None:
    """Unified annotations with one query per video (what `decode` reads)."""
    queries = [Query(f"q{i}", f"query {i}", vid, 10.0, ((0.0, 1.0),), "train") for i, vid in enumerate(video_ids)]
    write_queries(path, queries)
