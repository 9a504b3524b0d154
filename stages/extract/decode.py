"""Decode every annotated video once into the zarr frame cache (`cache/<dataset>/frames.zarr`).

    python pipeline.py decode                                  # local dask cluster, `decode.workers` processes
    python pipeline.py decode -s workers=8 -s codec=jpeg       # more workers, lossy storage
    python pipeline.py decode -s scheduler_address=tcp://host:8786   # an existing dask cluster (shared filesystem)
    dvc repro decode                                           # the dvc stage (its output persists between runs)

One dask task decodes and writes one video (one writer per shard); with `scheduler_address` the workers must have
this package installed and see the same paths. Inside the task the decoder runs in a forked child process with a
hard timeout, so a hanging or crashing decoder costs one video, never the worker. A video is moved into the cache
only when complete; a re-run skips videos whose stored settings and source file are unchanged, so killing the
stage at any moment and running it again finishes only the remaining videos. Failures (a missing file included) go
to `cache/<dataset>/decode_failures.jsonl` with their reasons, and the stage fails when there are more than
`max_failures`; the videos it stored are the available set that every later stage uses (`stages.data.available`).

A merged video of the QVHighlights PRVR re-split (`prepare.merge_sources: true`, annotations with `parts`) has no
file of its own: its clips are decoded one after the other into one array, on one grid of frame times, so frame i
shows time i / fps of the timeline the moments are on; each clip's place and provenance are in the array's `parts`
attribute.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.data.available import Failure, failures_path, write_failures
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.files import file_fingerprint, same_file
from stages.data.frame_cache import (
    FrameCache,
    FrameStorage,
    ensure_cache,
    new_staging_path,
    publish_video,
    staging_dir,
    write_video,
)
from stages.data.progress import progress_bar
from stages.data.schema import VideoPart, read_queries
from stages.data.video_io import (
    RESIZE_POLICY,
    DecodedVideo,
    Decoder,
    decode_video,
    decoder_version,
    frames_on_ticks,
    tick_range,
    uniform_cap,
)
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
class ClipSource:
    """One clip of a merged video (`prepare.merge_sources`): its file and where it plays on the merged timeline."""

    video_id: str
    path: str  # absolute
    offset: float  # seconds from the merged video's start
    duration: float  # seconds, as the annotations give it


@dataclass(frozen=True)
class DecodeJob:
    """One video to decode: where it is and where it goes (absolute paths, so remote workers can run it)."""

    video_id: str
    source: str  # the file; for a merged video, its clips' files joined by " + "
    cache_path: str
    config: DecodeConfig
    clips: tuple[ClipSource, ...] = ()  # a merged video's clips in order (empty for an ordinary video)


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
    skipped: list[str]  # already cached with these settings (`source_gone` included)
    failures: list[DecodeOutcome]  # missing files included; all of them are in the failure manifest
    source_gone: list[str] = field(default_factory=list)  # cached with these settings, file gone: frames kept


def run_decode(base: BaseConfig, config: DecodeConfig) -> DecodeSummary:
    """Decode every annotated video that is not already cached with the same settings.

    A missing file is a failure like an unreadable one (in the manifest, counted against `max_failures`), unless
    the video is already cached with these settings: then its cached frames are kept.
    """
    queries = read_queries(base.annotations_path)
    videos = dict(sorted({query.video_id: query.parts for query in queries}.items()))
    video_dir = Path(config.video_dir)
    if not video_dir.is_dir():
        raise PipelineError(
            f"decode.video_dir {str(video_dir)!r} does not exist (relative paths start at {Path.cwd()}); "
            "set it to the folder that holds the videos"
        )
    sources, missing = find_sources(videos, video_dir, config.extensions)
    cache_path = base.frames_path.resolve()
    ensure_cache(cache_path)
    cache = FrameCache(cache_path)
    settings = _settings(config)
    gone = [vid for vid in missing if vid in cache and cache.attrs(vid).get("settings") == settings]
    failed = [DecodeOutcome(vid, path, reason=reason) for vid, (path, reason) in missing.items() if vid not in gone]
    skipped = [vid for vid, paths in sources.items() if is_up_to_date(cache, vid, paths, config)]
    done = set(skipped)  # sets: a re-run of a large, cached dataset checks every video against them
    jobs = [_job(vid, paths, videos[vid], cache_path, config) for vid, paths in sources.items() if vid not in done]
    outcomes = run_decode_jobs(jobs, config, done_before=len(skipped) + len(gone)) if jobs else []
    with contextlib.suppress(OSError):  # the staging folder is empty unless a worker was killed mid-write
        staging_dir(cache_path).rmdir()
    failures = sorted(failed + [o for o in outcomes if o.reason is not None], key=lambda o: o.video_id)
    write_failures(failures_path(base), [Failure(f.video_id, f.source, f.reason or "") for f in failures])
    if gone:
        print(f"decode: {len(gone)} cached video(s) have no file any more, e.g. {gone[:3]}: kept", file=sys.stderr)
    if len(failures) > config.max_failures:
        listed = "; ".join(f"{f.video_id}: {f.reason}" for f in failures[:5])
        hint = " (check decode.video_dir and decode.extensions)" if failed else ""
        raise PipelineError(
            f"{len(failures)} video(s) could not be decoded (max_failures={config.max_failures}), listed in "
            f"{failures_path(base)}: {listed}{' ...' if len(failures) > 5 else ''}{hint}. Fix or remove them, or "
            "raise decode.max_failures to go on without them; the decoded videos are kept"
        )
    decoded = [outcome.video_id for outcome in outcomes if outcome.reason is None]
    return DecodeSummary(decoded=decoded, skipped=skipped + gone, failures=failures, source_gone=gone)


def find_sources(
    videos: Mapping[str, Sequence[VideoPart]], video_dir: Path, extensions: tuple[str, ...]
) -> tuple[dict[str, list[Path]], dict[str, tuple[str, str]]]:
    """The files of every video (its own, or for a merged video each clip's), the first extension that exists.

    Returns the videos whose files were all found (id -> files, in order) and the others (id -> (the path looked
    for, the reason)).
    """
    tried = f"extensions tried: {list(extensions)}"
    found: dict[str, list[Path]] = {}
    missing: dict[str, tuple[str, str]] = {}
    for vid, parts in videos.items():
        names = [part.video_id for part in parts] or [vid]
        paths = {name: _find(video_dir, name, extensions) for name in names}
        absent = [str(video_dir / f"{name}.{extensions[0].lstrip('.')}") for name, path in paths.items() if not path]
        if not absent:
            found[vid] = [paths[name] for name in names]
        elif parts:
            reason = f"file not found: {len(absent)} of its {len(names)} clips, e.g. {absent[0]} ({tried})"
            missing[vid] = (" + ".join(absent), reason)
        else:
            missing[vid] = (absent[0], f"file not found ({tried})")
    return found, missing


def _find(video_dir: Path, name: str, extensions: tuple[str, ...]) -> Path | None:
    """`<video_dir>/<name>.<ext>` for the first extension that exists."""
    return next((c for ext in extensions if (c := video_dir / f"{name}.{ext.lstrip('.')}").is_file()), None)


def _job(vid: str, paths: list[Path], parts: Sequence[VideoPart], cache_path: Path, config: DecodeConfig) -> DecodeJob:
    files = [str(path.resolve()) for path in paths]
    if not parts:
        return DecodeJob(vid, files[0], str(cache_path), config)
    clips = tuple(ClipSource(p.video_id, f, p.offset, p.duration) for p, f in zip(parts, files, strict=True))
    return DecodeJob(vid, " + ".join(files), str(cache_path), config, clips)


def _settings(config: DecodeConfig) -> dict[str, Any]:
    """The settings as the cached attributes hold them (after a JSON round trip)."""
    return json.loads(json.dumps(config.settings()))


def is_up_to_date(cache: FrameCache, video_id: str, sources: Path | Sequence[Path], config: DecodeConfig) -> bool:
    """Whether the cached video was made with `config`'s settings from the same file (a merged video: clips).

    A file is the same when its size and mtime match the recorded ones or, if only the mtime changed (a copy,
    a checkout), when its sha256 does.
    """
    if video_id not in cache:
        return False
    attrs = cache.attrs(video_id)
    if attrs.get("settings") != _settings(config):
        return False
    paths = [sources] if isinstance(sources, Path) else list(sources)
    recorded = [part.get("source", {}) for part in attrs["parts"]] if "parts" in attrs else [attrs.get("source", {})]
    return len(recorded) == len(paths) and all(same_file(p, r) for p, r in zip(paths, recorded, strict=True))


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
    if job.clips:
        frames, parts = _decode_clips(job)
        provenance: dict[str, Any] = {"parts": parts}
    else:
        source = Path(job.source)
        decoded = _decode_file(source, config)
        frames, provenance = decoded.frames, {"source": _fingerprint(source, decoded)}
    kept = frames[uniform_cap(len(frames), config.max_frames)]
    attributes = {
        "video_id": job.video_id,
        "fps": config.fps,
        "frame_count": len(kept),
        "frames_at_fps": len(frames),
        **provenance,
        "decoder": decoder_version(config.decoder),
        "resize": RESIZE_POLICY.format(size=config.size),
        "codec": config.storage.describe(),
        "max_frames": config.max_frames,
        "settings": config.settings(),
        "complete": True,
    }
    publish_video(write_video(staged, kept, attributes, config.storage), job.cache_path, job.video_id)
    return len(kept)


def _decode_file(path: Path, config: DecodeConfig, offset: float = 0.0, duration: float | None = None) -> DecodedVideo:
    """One file at the stage's settings (a clip: from `offset` on the merged timeline, for `duration` seconds)."""
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    return decode_video(path, config.fps, config.size, config.decoder, offset, duration)


def _decode_clips(job: DecodeJob) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A merged video's clips decoded in order onto one grid of ticks (frame i shows time i / fps of the merged
    timeline, the one `prepare` put the moments on), and each clip's place and provenance."""
    pieces, parts = [], []
    next_frame = 0
    for clip in job.clips:
        path = Path(clip.path)
        try:
            decoded = _decode_file(path, job.config, clip.offset, clip.duration)
        except Exception as exc:  # noqa: BLE001 - the reason names the clip
            raise ValueError(f"clip {clip.video_id} ({path}): {type(exc).__name__}: {exc}") from exc
        first, stop = tick_range(clip.offset, clip.duration, job.config.fps)
        if first != next_frame:
            raise ValueError(f"clip {clip.video_id} starts at {clip.offset:g} s, not where the clip before it ends")
        pieces.append(frames_on_ticks(decoded, first, stop))
        parts.append(
            {
                "video_id": clip.video_id,
                "offset": clip.offset,
                "duration": clip.duration,
                "first_frame": first,
                "frame_count": stop - first,
                "decoded_frames": len(decoded.frames),
                "source": _fingerprint(path, decoded),
            }
        )
        next_frame = stop
    return np.concatenate(pieces), parts


def _fingerprint(path: Path, decoded: DecodedVideo) -> dict[str, Any]:
    """What identifies a source file (for re-runs, `files.file_fingerprint`) and what it looked like."""
    return {
        "path": str(path),
        **file_fingerprint(path),
        "frames": decoded.source_frames,
        "width": decoded.source_size[0],
        "height": decoded.source_size[1],
        "duration": decoded.duration,
    }


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

    outcomes = []
    with dask_client(config.workers, config.scheduler_address) as client:
        run = uuid.uuid4().hex[:8]
        futures = client.map(decode_task, jobs, key=[f"decode-{run}-{job.video_id}" for job in jobs])
        by_key = {future.key: job for future, job in zip(futures, jobs, strict=True)}
        with progress_bar(total=done_before + len(jobs), initial=done_before, desc="decode", unit="video") as bar:
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
