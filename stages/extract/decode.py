"""Decode every annotated video once into the zarr frame cache (`cache/<dataset>/frames.zarr`).

    python pipeline.py decode                                  # local dask cluster, `decode.workers` processes
    python pipeline.py decode -s workers=8 -s codec=jpeg       # more workers, lossy storage
    python pipeline.py decode -s scheduler_address=tcp://host:8786   # an existing dask cluster (shared filesystem)
    dvc repro decode                                           # the dvc stage (its output persists between runs)

One dask task decodes and writes one video (one writer per shard); with `scheduler_address` the workers must have
this package installed and see the same paths. Inside the task the decoder runs in a forked child process with a
hard timeout, so a hanging or crashing decoder costs one video, never the worker. A video is moved into the cache
only when complete; a re-run skips videos whose stored settings and source file are unchanged, so killing the
stage at any moment and running it again finishes only the remaining videos. Failures go to
`cache/<dataset>/decode_failures.jsonl`, and the stage fails when there are more than `max_failures`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.files import atomic_write_text, file_sha256, same_file
from stages.data.frame_cache import (
    FrameCache,
    FrameStorage,
    ensure_cache,
    new_staging_path,
    publish_video,
    staging_dir,
    write_video,
)
from stages.data.schema import read_queries
from stages.data.video_io import RESIZE_POLICY, Decoder, decode_video, decoder_version, uniform_cap
from stages.extract.cluster import dask_client


@dataclass(frozen=True)
class DecodeConfig:
    """The `decode` section of params.yaml."""

    video_dir: str = "data/synthetic/videos"  # videos are found as <video_dir>/<video_id>.<extension>
    extensions: tuple[str, ...] = ("mp4",)  # tried in order
    fps: float = 3.0  # frames kept per second of video (the official pipeline uses 3)
    size: int = 224  # short side resized to this, then a centre crop size x size
    decoder: Decoder = "pyav"  # pyav (the official decoder; fastest here) or decord
    codec: Literal["zstd", "jpeg"] = "zstd"  # lossless zstd or lossy JPEG
    zstd_level: int = 3  # zstd level when codec is zstd
    jpeg_quality: int = 90  # JPEG quality when codec is jpeg
    max_frames: int | None = None  # keep at most this many frames per video (uniformly); None keeps all
    workers: int = 2  # local dask worker processes (one thread each)
    scheduler_address: str | None = None  # an existing dask scheduler (e.g. tcp://host:8786) instead of a local one
    timeout_s: float = 600.0  # a video whose decoding takes longer is recorded as failed
    max_failures: int = 0  # the stage fails when more videos than this could not be decoded

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.size < 2 or self.timeout_s <= 0 or self.workers < 1 or self.max_failures < 0:
            raise ValueError("fps, timeout_s must be > 0, size >= 2, workers >= 1, max_failures >= 0")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError("max_frames must be >= 1 or null")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")

    @property
    def storage(self) -> FrameStorage:
        """How frames are stored."""
        return FrameStorage(codec=self.codec, zstd_level=self.zstd_level, jpeg_quality=self.jpeg_quality)

    def settings(self) -> dict[str, Any]:
        """Everything that changes the stored frames: a cached video made with other settings is decoded again."""
        return {
            "fps": self.fps,
            "size": self.size,
            "decoder": self.decoder,
            "codec": self.storage.describe(),
            "max_frames": self.max_frames,
        }


@dataclass(frozen=True)
class DecodeJob:
    """One video to decode: where it is and where it goes (absolute paths, so remote workers can run it)."""

    video_id: str
    source: str
    cache_path: str
    config: DecodeConfig


@dataclass(frozen=True)
class DecodeOutcome:
    """What happened to one video: `reason` is None on success."""

    video_id: str
    source: str
    frames: int = 0
    reason: str | None = None


@dataclass(frozen=True)
class DecodeSummary:
    """The result of a run."""

    decoded: list[str]
    skipped: list[str]
    failures: list[DecodeOutcome]


def failures_path(base: BaseConfig) -> Path:
    """The failure manifest of the dataset (`cache/<dataset>/decode_failures.jsonl`)."""
    return base.dataset_cache / "decode_failures.jsonl"


def run_decode(base: BaseConfig, config: DecodeConfig) -> DecodeSummary:
    """Decode every video of the prepared annotations that is not already cached with the same settings."""
    queries = read_queries(base.annotations_path)
    video_ids = sorted({query.video_id for query in queries})
    merged = {q.video_id: [part.video_id for part in q.parts] for q in queries if q.parts}
    sources = find_videos(video_ids, Path(config.video_dir), config.extensions, merged)
    cache_path = base.frames_path.resolve()
    ensure_cache(cache_path)
    cache = FrameCache(cache_path)
    skipped = [vid for vid in video_ids if is_up_to_date(cache, vid, sources[vid], config)]
    jobs = [
        DecodeJob(vid, str(sources[vid].resolve()), str(cache_path), config) for vid in video_ids if vid not in skipped
    ]
    outcomes = run_decode_jobs(jobs, config, done_before=len(skipped)) if jobs else []
    with contextlib.suppress(OSError):  # the staging folder is empty unless a worker was killed mid-write
        staging_dir(cache_path).rmdir()
    failures = [outcome for outcome in outcomes if outcome.reason is not None]
    _write_failures(failures_path(base), failures)
    if len(failures) > config.max_failures:
        listed = "; ".join(f"{f.video_id}: {f.reason}" for f in failures[:5])
        raise PipelineError(
            f"{len(failures)} video(s) could not be decoded (max_failures={config.max_failures}), listed in "
            f"{failures_path(base)}: {listed}{' ...' if len(failures) > 5 else ''}. Fix or remove them, or raise "
            "decode.max_failures; the decoded videos are kept"
        )
    decoded = [outcome.video_id for outcome in outcomes if outcome.reason is None]
    return DecodeSummary(decoded=decoded, skipped=skipped, failures=failures)


def find_videos(
    video_ids: list[str],
    video_dir: Path,
    extensions: tuple[str, ...],
    merged: Mapping[str, list[str]] | None = None,
) -> dict[str, Path]:
    """The file of every video id (first extension that exists); a missing file is a PipelineError.

    `merged` maps the ids of videos that `prepare.merge_sources` made from several clips to those clips: such a
    video has a file only once the user concatenated its clips, and the error says so.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for vid in video_ids:
        candidates = [video_dir / f"{vid}.{ext.lstrip('.')}" for ext in extensions]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(str(candidates[0]))
        else:
            found[vid] = path
    unmerged = sorted(vid for vid in (merged or {}) if vid not in found)
    if unmerged:
        raise PipelineError(
            f"{len(unmerged)} video(s) are merged from several clips by prepare.merge_sources (e.g. {unmerged[0]!r} = "
            f"{merged[unmerged[0]]}) and decode does not concatenate clips yet: concatenate each group into "
            "<video_dir>/<merged id>.mp4 (ffmpeg's concat demuxer, in the listed order) or set "
            "prepare.merge_sources false"
        )
    if missing:
        raise PipelineError(
            f"{len(missing)} annotated video(s) not found (extensions tried: {list(extensions)}): "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; check decode.video_dir and "
            "decode.extensions"
        )
    return found


def is_up_to_date(cache: FrameCache, video_id: str, source: Path, config: DecodeConfig) -> bool:
    """Whether the cached video was made with `config`'s settings from the same file (`files.same_file`)."""
    if video_id not in cache:
        return False
    attrs = cache.attrs(video_id)
    if attrs.get("settings") != json.loads(json.dumps(config.settings())):
        return False
    return same_file(source, attrs.get("source", {}))


def decode_task(job: DecodeJob) -> DecodeOutcome:
    """Decode and write one video in a forked child with a hard timeout (the dask task)."""
    staged = new_staging_path(job.cache_path, job.video_id)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_end)
        try:
            report = {"frames": _decode_and_publish(job, staged)}
        except BaseException as exc:  # noqa: BLE001 - every error of the child is reported to the parent
            report = {"reason": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    try:
        report = _read_report(read_end, deadline=time.monotonic() + job.config.timeout_s)
    finally:
        os.close(read_end)
    if report is None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if report is None:
        reason = f"timeout: decoding took more than {job.config.timeout_s:g} s"
    elif not report:
        reason = f"decoder crashed ({_describe_status(status)})"
    else:
        reason = report.get("reason")
    if reason is not None:
        shutil.rmtree(staged, ignore_errors=True)
    return DecodeOutcome(job.video_id, job.source, int((report or {}).get("frames", 0)), reason)


def _decode_and_publish(job: DecodeJob, staged: Path) -> int:
    """Decode, write under the staging folder, move into the cache; returns the number of frames."""
    config = job.config
    source = Path(job.source)
    stat = source.stat()
    if stat.st_size == 0:
        raise ValueError("empty file")
    decoded = decode_video(source, config.fps, config.size, config.decoder)
    frames = decoded.frames[uniform_cap(len(decoded.frames), config.max_frames)]
    attributes = {
        "video_id": job.video_id,
        "fps": config.fps,
        "frame_count": len(frames),
        "frames_at_fps": len(decoded.frames),
        "source": {
            "path": str(source),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(source),
            "frames": decoded.source_frames,
            "width": decoded.source_size[0],
            "height": decoded.source_size[1],
            "duration": decoded.duration,
        },
        "decoder": decoder_version(config.decoder),
        "resize": RESIZE_POLICY.format(size=config.size),
        "codec": config.storage.describe(),
        "max_frames": config.max_frames,
        "settings": config.settings(),
        "complete": True,
    }
    publish_video(write_video(staged, frames, attributes, config.storage), job.cache_path, job.video_id)
    return len(frames)


def _read_report(fd: int, deadline: float) -> dict | None:
    """The child's JSON report ({} if it died without one), or None when the deadline passed first."""
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return json.loads(b"".join(chunks)) if chunks else {}
        chunks.append(chunk)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def run_decode_jobs(jobs: list[DecodeJob], config: DecodeConfig, done_before: int = 0) -> list[DecodeOutcome]:
    """Run the jobs on dask, one task per video, with a progress bar of done, failed and remaining videos."""
    from dask.distributed import as_completed
    from tqdm import tqdm

    outcomes = []
    with dask_client(config.workers, config.scheduler_address) as client:
        run = uuid.uuid4().hex[:8]
        futures = client.map(decode_task, jobs, key=[f"decode-{run}-{job.video_id}" for job in jobs])
        by_key = {future.key: job for future, job in zip(futures, jobs, strict=True)}
        with tqdm(total=done_before + len(jobs), initial=done_before, desc="decode", unit="video") as bar:
            for future in as_completed(futures):
                job = by_key[future.key]
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - a lost worker fails the video, not the run
                    outcome = DecodeOutcome(job.video_id, job.source, reason=f"{type(exc).__name__}: {exc}")
                outcomes.append(outcome)
                bar.update()
                bar.set_postfix(failed=sum(o.reason is not None for o in outcomes))
    return outcomes


def _write_failures(path: Path, failures: list[DecodeOutcome]) -> None:
    """Write the failure manifest atomically (an empty file when every video decoded)."""
    ordered = sorted(failures, key=lambda f: f.video_id)
    records = [{"video_id": f.video_id, "path": f.source, "reason": f.reason} for f in ordered]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))
