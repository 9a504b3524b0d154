"""The `prepare` stage: convert a dataset's native annotation files into the unified `annotations.jsonl`.

    python pipeline.py prepare                                   # the `prepare` section of params.yaml
    python pipeline.py prepare -s drop_bad_lines=true            # drop malformed lines instead of failing
    python pipeline.py -s base.dataset=qvh prepare -s format=qvhighlights -s merge_sources=true \\
        -s 'files={train: data/qvh/highlight_train_release.jsonl, test: data/qvh/highlight_val_release.jsonl}'
    dvc repro prepare

By default any malformed line stops the stage with every problem listed (file:line: reason), and the full list
is also written to `cache/<dataset>/annotations.problems.txt`. With `drop_bad_lines` the bad lines are left out
and written, with their raw text, to `cache/<dataset>/annotations.dropped.jsonl`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stages.data.config import REPLACED_WHEN_LAYERED, BaseConfig
from stages.data.converters import FORMATS, BadLine, Conversion, convert, read_durations
from stages.data.errors import PipelineError
from stages.data.schema import Query, write_queries

LISTED_IN_MESSAGE = 20  # bad lines quoted in the error message; all of them are in the problems file

SYNTHETIC_FILES = {split: f"data/synthetic/annotations/synthetic_{split}.jsonl" for split in ("train", "val", "test")}


@dataclass(frozen=True)
class PrepareConfig:
    """The `prepare` section: which native files to convert and how."""

    format: str = "tvr"  # a key of converters.FORMATS: tvr, propy, qvhighlights, activitynet, charades, mscaption
    files: dict[str, str] = field(  # split -> native file, in order (a later params file replaces the whole map)
        default_factory=lambda: dict(SYNTHETIC_FILES), metadata=REPLACED_WHEN_LAYERED
    )
    durations: tuple[str, ...] = ()  # charades / mscaption: CSV tables of video durations (Charades_v1_*.csv)
    duration_columns: tuple[str, str] = ("id", "length")  # the video id and duration (seconds) columns of those
    merge_sources: bool = False  # qvhighlights: the PRVR re-split, one video per source (converters.merge_sources)
    moment_tolerance: float = 0.0  # moments overrunning [0, duration] by at most this (seconds) are clipped
    drop_bad_lines: bool = False  # drop malformed lines (listed in annotations.dropped.jsonl) instead of failing
    annotation_dir: str | None = None  # the folder dvc.yaml's prepare stage tracks: files and durations must be in it

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {sorted(FORMATS)}")
        if not self.files:
            raise ValueError("files is empty: give at least one split -> annotation file")
        if self.moment_tolerance < 0:
            raise ValueError(f"moment_tolerance {self.moment_tolerance} is negative")


def problems_path(base: BaseConfig) -> Path:
    """Every bad line of the last failed run (file:line: reason), beside the annotations."""
    return base.annotations_path.with_suffix(".problems.txt")


def dropped_path(base: BaseConfig) -> Path:
    """The lines dropped by the last run with `drop_bad_lines` (JSON lines: file, line, item, reason, text)."""
    return base.annotations_path.with_suffix(".dropped.jsonl")


def run_prepare(base: BaseConfig, cfg: PrepareConfig) -> Conversion:
    """Convert `cfg.files` and write `base.annotations_path`; fail listing every bad line unless dropping them.

    Returns the written queries and the dropped lines.
    """
    check_tracked(cfg)
    durations, bad_rows = None, []
    if cfg.durations:
        durations, bad_rows = read_durations(cfg.durations, *cfg.duration_columns)
    converted = convert(cfg.files, cfg.format, durations, cfg.moment_tolerance, cfg.merge_sources)
    conversion = Conversion(converted.queries, [*bad_rows, *converted.bad_lines])
    bad = conversion.bad_lines
    if bad and not cfg.drop_bad_lines:
        _write_text(problems_path(base), "".join(f"{line}\n" for line in bad))
        raise PipelineError(_failure_message(bad, problems_path(base)))
    if not conversion.queries:
        raise PipelineError(f"no valid query in {', '.join(cfg.files.values())}; nothing to write")
    write_queries(base.annotations_path, conversion.queries)
    _write_text(problems_path(base), None)
    _write_text(dropped_path(base), "".join(json.dumps(b.to_json(), ensure_ascii=False) + "\n" for b in bad) or None)
    if bad:
        print(f"prepare: dropped {len(bad)} bad line(s), listed in {dropped_path(base)}")
    print(f"prepare: wrote {base.annotations_path}")
    for line in _summary(conversion.queries):
        print(f"  {line}")
    return conversion


def check_tracked(cfg: PrepareConfig) -> None:
    """With `annotation_dir` set (as under DVC, whose `prepare` stage depends on that folder), every native file
    must lie inside it: a file elsewhere could change without `dvc repro` noticing."""
    if cfg.annotation_dir is None:
        return
    folder = Path(cfg.annotation_dir).resolve()
    named = [(f"files.{split}", path) for split, path in cfg.files.items()]
    named += [(f"durations[{i}]", path) for i, path in enumerate(cfg.durations)]
    outside = [(key, path) for key, path in named if not Path(path).resolve().is_relative_to(folder)]
    if outside:
        key, path = outside[0]
        raise PipelineError(
            f"prepare.{key} {path!r} is not inside prepare.annotation_dir {cfg.annotation_dir!r}, the folder that "
            f"DVC tracks for the prepare stage ({len(outside)} such file(s)); move the files there or set "
            "prepare.annotation_dir to the folder that holds them"
        )


def _write_text(path: Path, text: str | None) -> None:
    """Write `text` to `path` atomically, or remove a stale `path` when `text` is None."""
    if text is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _failure_message(bad: Sequence[BadLine], listing: Path) -> str:
    shown = [str(line) for line in bad[:LISTED_IN_MESSAGE]]
    if len(bad) > LISTED_IN_MESSAGE:
        shown.append(f"... and {len(bad) - LISTED_IN_MESSAGE} more")
    return (
        f"{len(bad)} bad annotation line(s); fix them, or set prepare.drop_bad_lines: true to drop them "
        f"(all are listed in {listing}):\n" + "\n".join(shown)
    )


def _summary(queries: Sequence[Query]) -> list[str]:
    """One line per split: its numbers of queries and videos."""
    videos: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for query in queries:
        videos.setdefault(query.split, set()).add(query.video_id)
        counts[query.split] = counts.get(query.split, 0) + 1
    return [f"{split}: {counts[split]} queries, {len(videos[split])} videos" for split in counts]
