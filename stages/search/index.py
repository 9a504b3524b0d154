"""The `index` command: a folder of videos -> a search index of one trained model's units.

    python pipeline.py index VIDEO_DIR --model propy --out INDEX_DIR            # the ProPy `dvc repro` trained
    python pipeline.py index VIDEO_DIR --model msl --out INDEX_DIR --checkpoint cache/tvr/baselines/msl
    python pipeline.py index VIDEO_DIR --model propy --out INDEX_DIR -s batch_videos=4 -s ann.min_units=500000

The index folder:

    index.json                  the indexed folder, the model (where to load it) and its identity: weights sha256,
                                CLIP sha256, model config and the frame settings (`decode` section)
    frames.zarr/                the folder's videos decoded once, by the decode stage's code, in its cache format
    vectors/<key>.npz           one file per finished video: units (fp16), windows (seconds), thumbnail frames,
                                the packed tensor of models with their own score, and the video's record
    thumbs/<key>/<frame>.jpg    one thumbnail per unit: the unit's middle frame (units sharing it share the file)
    failures.jsonl              the files of the last run that could not be decoded, with the reason
    store/                      every video's units in one memory-mapped matrix, and the approximate index above
                                `search.ann.min_units` units (`stages/search/store.py`)

A re-run indexes new files, re-indexes changed ones (size and mtime, or sha256) and drops removed ones; a video is
finished once its `vectors/<key>.npz` exists (written last, atomically), so a run killed at any moment is finished
by the next one without redoing finished videos (decoded frames are kept too). An index of another model, config
or folder is refused. Files that cannot be decoded are reported and skipped, as in `decode`; symbolic links to
files outside the folder are skipped (the web page serves only files inside it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.errors import PipelineError
from stages.data.files import atomic_write_text, current_fingerprint, same_file
from stages.data.frame_cache import FrameCache, ensure_cache
from stages.data.progress import progress_bar
from stages.extract.decode import DecodeConfig, DecodeJob, decode_task, is_up_to_date, run_decode_jobs
from stages.search.ann import ANN_FILE, AnnConfig, build_ann
from stages.search.engine import EngineConfig
from stages.search.models import EncodedVideo, ModelChoice, SearchModel, load_search_model
from stages.search.store import StoreWriter, VideoRecord, remove_partial_stores

INDEX_FORMAT = 1


@dataclass(frozen=True)
class SearchConfig:
    """The `search` section of params.yaml: indexing, thumbnails and how queries are scored."""

    extensions: tuple[str, ...] = ("mp4", "mkv", "webm", "mov", "avi", "m4v")  # video files (case-insensitive)
    batch_videos: int = 8  # videos per forward pass when indexing
    batch_frames: int = 256  # frames per CLIP forward (feature models)
    device: str = "auto"  # auto | cpu | cuda
    thumbnail_size: int = 160  # thumbnail side in pixels (frames are the cache's square crops)
    thumbnail_quality: int = 85  # JPEG quality of thumbnails
    scan: EngineConfig = field(default_factory=EngineConfig)  # exact scoring
    ann: AnnConfig = field(default_factory=AnnConfig)  # the approximate index (built above ann.min_units units)

    def __post_init__(self) -> None:
        if self.batch_videos < 1 or self.batch_frames < 1 or self.thumbnail_size < 8:
            raise ValueError("batch_videos and batch_frames must be >= 1, thumbnail_size >= 8")


class IndexLayout:
    """Where an index folder keeps what (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = root / "index.json"
        self.frames = root / "frames.zarr"  # the frame cache
        self.vectors = root / "vectors"  # one .npz per finished video
        self.thumbs = root / "thumbs"  # one folder of JPEGs per video
        self.store = root / "store"  # the consolidated, memory-mapped store
        self.failures = root / "failures.jsonl"  # files of the last run that could not be decoded

    def vector_file(self, key: str) -> Path:
        """The .npz of one video."""
        return self.vectors / f"{key}.npz"


@dataclass(frozen=True)
class VideoFile:
    """A video file found in the folder."""

    video_id: str
    path: str  # relative, posix
    key: str


@dataclass(frozen=True)
class IndexSummary:
    """What a run did."""

    added: list[str]
    updated: list[str]
    removed: list[str]
    unchanged: int
    failures: list[dict[str, str]]  # {"path", "reason"}
    videos: int
    units: int
    approximate: bool

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"indexed {len(self.added)} new, {len(self.updated)} changed, removed {len(self.removed)}, "
            f"unchanged {self.unchanged}, failed {len(self.failures)}; {self.videos} videos, {self.units} units"
            f"{', approximate index' if self.approximate else ''}"
        )


def run_index(
    video_dir: Path, out: Path, choice: ModelChoice, frames: DecodeConfig, config: SearchConfig
) -> IndexSummary:
    """Index every video of `video_dir` (recursively) with the model of `choice` into `out`; see the module doc."""
    video_dir = Path(video_dir).resolve()
    if not video_dir.is_dir():
        raise PipelineError(f"video folder {video_dir} does not exist")
    layout = IndexLayout(Path(out).resolve())
    model = load_search_model(choice, config.device, config.batch_frames)
    identity = {**model.identity, "frames": json.loads(json.dumps(frames.settings()))}
    _claim(layout, video_dir, choice, identity)
    files, refused = scan_folder(video_dir, config.extensions, exclude=layout.root)
    finished = _finished_records(layout)
    present = {f.key for f in files}
    removed = sorted(key for key in finished if key not in present)
    for key in _stale_keys(layout, present):  # deleted files, and leftovers of videos a killed run never finished
        _forget(layout, key)
    todo = [f for f in files if not _is_current(finished.get(f.key), f, video_dir)]
    ensure_cache(layout.frames)
    decoded, failed = _decode(todo, video_dir, layout, frames)
    for video, _ in failed:  # a changed file that no longer decodes loses its old entry
        _forget(layout, video.key)
    new = _encode(model, decoded, video_dir, layout, FrameCache(layout.frames), config)
    failures = refused + [{"path": f.path, "reason": reason} for f, reason in failed]
    atomic_write_text(layout.failures, "".join(json.dumps(f) + "\n" for f in failures))
    for failure in failures:
        print(f"index: skipped {failure['path']}: {failure['reason']}", file=sys.stderr)
    known = {**finished, **{record.key: record for record in new}}
    failed_keys = {video.key for video, _ in failed}
    records = {f.key: known[f.key] for f in files if f.key in known and f.key not in failed_keys}
    if removed or failed or new or not (layout.store / "meta.json").is_file():
        _consolidate(layout, list(records.values()), model, config.ann)
    return IndexSummary(
        added=[f.path for f in decoded if f.key not in finished],
        updated=[f.path for f in decoded if f.key in finished],
        removed=[finished[key].path for key in removed],
        unchanged=len(files) - len(todo),
        failures=failures,
        videos=len(records),
        units=sum(r.units for r in records.values()),
        approximate=(layout.store / ANN_FILE).is_file(),
    )


# ---- the folder --------------------------------------------------------------------------------------------------


def scan_folder(
    video_dir: Path, extensions: tuple[str, ...], exclude: Path | None = None
) -> tuple[list[VideoFile], list[dict[str, str]]]:
    """Every video file under `video_dir` (hidden entries skipped), sorted, and the ones refused with a reason.

    A video's id is its relative path without the extension; when two files share it (`a.mp4`, `a.mkv`), both keep
    their extension. Symbolic links to files outside the folder are refused.
    """
    wanted = {ext.lower().lstrip(".") for ext in extensions}
    paths, refused = [], []
    for directory, subdirs, names in os.walk(video_dir):
        here = Path(directory)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and (exclude is None or here / d != exclude))
        for name in names:
            path = here / name
            if name.startswith(".") or path.suffix.lower().lstrip(".") not in wanted:
                continue
            relative = path.relative_to(video_dir).as_posix()
            if not path.resolve().is_relative_to(video_dir):
                refused.append({"path": relative, "reason": "a symbolic link to a file outside the folder"})
            elif not path.is_file():
                refused.append({"path": relative, "reason": "not a regular file"})
            else:
                paths.append(relative)
    paths.sort()
    stems = [str(Path(p).with_suffix("")) for p in paths]
    shared = {s for s in stems if stems.count(s) > 1}
    files = [VideoFile(p if s in shared else s, p, video_key(p)) for p, s in zip(paths, stems, strict=True)]
    return files, refused


def video_key(relative: str) -> str:
    """A file-system-safe, unique name for a relative path: its readable tail and a hash of the whole path."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", relative)[-48:].lstrip(".-") or "video"
    return f"{slug}-{hashlib.sha1(relative.encode()).hexdigest()[:10]}"


# ---- the index folder ---------------------------------------------------------------------------------------------


def read_manifest(root: Path) -> dict[str, Any]:
    """index.json of an index folder."""
    path = IndexLayout(Path(root)).manifest
    if not path.is_file():
        raise PipelineError(f"{root} is not a search index (no index.json); build one with `python pipeline.py index`")
    return json.loads(path.read_text())


def _claim(layout: IndexLayout, video_dir: Path, choice: ModelChoice, identity: dict[str, Any]) -> None:
    """Write index.json for a new index; refuse an index of another folder, model or config."""
    manifest = {"format": INDEX_FORMAT, "video_dir": str(video_dir), "model": choice.to_dict(), "identity": identity}
    if layout.manifest.is_file():
        recorded = json.loads(layout.manifest.read_text())
        if recorded.get("video_dir") != str(video_dir):
            raise PipelineError(
                f"{layout.root} indexes the folder {recorded.get('video_dir')}, not {video_dir}; "
                "choose another --out for this folder"
            )
        old = recorded.get("identity", {})
        if old != identity:
            differs = sorted(k for k in {*old, *identity} if old.get(k) != identity.get(k))
            raise PipelineError(
                f"{layout.root} was built by {old.get('model')!r} with other {', '.join(differs)} than this "
                f"{identity['model']!r} run (its weights sha256 {str(old.get('weights_sha256'))[:12]}, this run's "
                f"{str(identity.get('weights_sha256'))[:12]}); an index holds one model: choose another --out, or "
                "delete the folder to rebuild it"
            )
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.manifest, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _finished_records(layout: IndexLayout) -> dict[str, VideoRecord]:
    """The record of every finished video, by key."""
    records = {}
    for path in sorted(layout.vectors.glob("*.npz")) if layout.vectors.is_dir() else []:
        with np.load(path) as data:
            records[path.stem] = VideoRecord.from_dict(json.loads(str(data["record"])))
    return records


def _is_current(record: VideoRecord | None, video: VideoFile, video_dir: Path) -> bool:
    return record is not None and record.path == video.path and same_file(video_dir / video.path, record.fingerprint)


def _stale_keys(layout: IndexLayout, present: set[str]) -> set[str]:
    """Keys with vectors, thumbnails or cached frames but no file in the folder any more."""
    keys = {path.stem for path in layout.vectors.glob("*.npz")} if layout.vectors.is_dir() else set()
    keys |= {path.name for path in layout.thumbs.iterdir()} if layout.thumbs.is_dir() else set()
    keys |= set(FrameCache(layout.frames).video_ids())
    return keys - present


def _forget(layout: IndexLayout, key: str) -> None:
    """Remove a video's vectors, thumbnails and cached frames."""
    layout.vector_file(key).unlink(missing_ok=True)
    shutil.rmtree(layout.thumbs / key, ignore_errors=True)
    shutil.rmtree(layout.frames / key, ignore_errors=True)


# ---- decoding and encoding ------------------------------------------------------------------------------------------


def _decode(
    todo: list[VideoFile], video_dir: Path, layout: IndexLayout, frames: DecodeConfig
) -> tuple[list[VideoFile], list[tuple[VideoFile, str]]]:
    """Decode the videos not already in the frame cache with these settings: (decoded or cached, (failed, reason))."""
    cache = FrameCache(layout.frames)
    jobs = [
        DecodeJob(f.key, str(video_dir / f.path), str(layout.frames), frames)
        for f in todo
        if not is_up_to_date(cache, f.key, video_dir / f.path, frames)
    ]
    if len(jobs) > 1 and frames.workers > 1:
        outcomes = run_decode_jobs(jobs, frames, done_before=len(todo) - len(jobs))
    else:
        outcomes = [decode_task(job) for job in progress_bar(jobs, desc="decode", unit="video", disable=not jobs)]
    reasons = {o.video_id: o.reason for o in outcomes if o.reason is not None}
    return [f for f in todo if f.key not in reasons], [(f, reasons[f.key]) for f in todo if f.key in reasons]


def _encode(
    model: SearchModel,
    videos: list[VideoFile],
    video_dir: Path,
    layout: IndexLayout,
    cache: FrameCache,
    config: SearchConfig,
) -> list[VideoRecord]:
    """Encode the decoded videos in batches; each finished video gets its thumbnails, then its .npz. Returns their
    records."""
    layout.vectors.mkdir(parents=True, exist_ok=True)
    records = []
    with progress_bar(total=len(videos), desc=f"index ({model.name})", unit="video", disable=not videos) as bar:
        for batch in _batches(videos, config.batch_videos):
            for video, encoded in zip(batch, model.encode_videos(cache, [v.key for v in batch]), strict=True):
                records.append(_write_video(layout, cache, video, video_dir, encoded, config))
                bar.update()
    return records


def _batches(items: list[VideoFile], size: int) -> Iterator[list[VideoFile]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _write_video(
    layout: IndexLayout,
    cache: FrameCache,
    video: VideoFile,
    video_dir: Path,
    encoded: EncodedVideo,
    config: SearchConfig,
) -> VideoRecord:
    """Write one video's thumbnails, then its vectors and record (the .npz marks the video finished)."""
    num_frames = cache.num_frames(video.key)
    attrs = cache.attrs(video.key)
    duration = video_duration(attrs, num_frames)
    middle = encoded.windows.mean(axis=1)
    thumbs = np.minimum((middle * num_frames).astype(np.int64), num_frames - 1).astype(np.int32)
    _write_thumbnails(layout.thumbs / video.key, cache, video.key, np.unique(thumbs), config)
    record = VideoRecord(
        video_id=video.video_id,
        path=video.path,
        key=video.key,
        fingerprint=current_fingerprint(video_dir / video.path, attrs.get("source", {})),  # decoding hashed it
        duration=duration,
        frames=num_frames,
        units=len(encoded.units),
    )
    arrays = {
        "units": encoded.units.astype(np.float16),
        "windows": (encoded.windows * duration).astype(np.float32),
        "thumbs": thumbs,
        "record": np.array(json.dumps(record.to_dict())),
    }
    if encoded.packed is not None:
        arrays["packed"] = encoded.packed.astype(np.float16)
    target = layout.vector_file(video.key)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, target)
    return record


def video_duration(attrs: dict[str, Any], num_frames: int) -> float:
    """Seconds a cached video covers: the decoded span plus one source frame (cached frames / fps without it)."""
    source = attrs.get("source", {})
    span, frames = float(source.get("duration") or 0.0), int(source.get("frames") or 0)
    if span > 0 and frames > 1:
        return span * frames / (frames - 1)
    return num_frames / float(attrs.get("fps") or 1.0)


def _write_thumbnails(directory: Path, cache: FrameCache, key: str, frames: np.ndarray, config: SearchConfig) -> None:
    from PIL import Image

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for index, pixels in zip(frames, cache.read(key, frames), strict=True):
        image = Image.fromarray(pixels)
        if image.width > config.thumbnail_size:
            image = image.resize((config.thumbnail_size, config.thumbnail_size), Image.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=config.thumbnail_quality)
        (directory / f"{int(index)}.jpg").write_bytes(out.getvalue())


# ---- the store ------------------------------------------------------------------------------------------------------


def _consolidate(layout: IndexLayout, records: list[VideoRecord], model: SearchModel, ann: AnnConfig) -> None:
    """Rebuild the store from the finished videos (in the folder's order) and, above the threshold, its ANN."""
    remove_partial_stores(layout.store)
    first = _load_vectors(layout, records[0].key) if records else None
    dim = first["units"].shape[1] if first is not None else 1
    packed_shape = tuple(first["packed"].shape) if first is not None and "packed" in first else None
    writer = StoreWriter(layout.store, sum(r.units for r in records), len(records), dim, packed_shape)
    for record in progress_bar(records, desc="store", unit="video", leave=False):
        arrays = _load_vectors(layout, record.key)
        packed = arrays["packed"][None] if "packed" in arrays else None
        writer.add([record], arrays["units"], arrays["windows"], arrays["thumbs"], packed)
    staged = writer.finish({"model": model.name})
    if writer.offsets[-1] >= ann.min_units:
        build_ann(writer.units, ann, staged / ANN_FILE)
    writer.publish()


def _load_vectors(layout: IndexLayout, key: str) -> dict[str, np.ndarray]:
    with np.load(layout.vector_file(key)) as data:
        return {name: data[name] for name in data.files if name != "record"}
