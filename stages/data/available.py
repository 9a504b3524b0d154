"""The available set: the annotated videos that `decode` stored, and the queries every later stage keeps.

`decode` lists every annotated video it could not store (file missing, empty, unreadable, truncated, too slow) in
the failure manifest `cache/<dataset>/decode_failures.jsonl`, one JSON object per line with the reason. Every later
stage (`features`, `train_propy`, `train_baseline@*`, `evaluate@*`) keeps exactly the queries whose video is not
listed there, so every model is trained and scored on the same queries; each stage logs what it left out, and every
metrics file records `queries_total`, `queries_evaluated` and `videos_unavailable`.

    available = available_queries(base, "test", key="evaluate.protocol.split")
    available.queries             # the kept queries, in annotation order
    available.counts()            # {"queries_total": ..., "queries_evaluated": ..., "videos_unavailable": ...}

Without a manifest (a cache built by other means) every annotated video counts as available.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.files import atomic_write_text
from stages.data.schema import Query, read_queries

MANIFEST_NAME = "decode_failures.jsonl"


@dataclass(frozen=True)
class Failure:
    """One line of the failure manifest: a video `decode` could not store, and why."""

    video_id: str
    path: str  # the file that failed (or was looked for); for a merged video, its clips joined by " + "
    reason: str

    def to_json(self) -> dict[str, str]:
        """The manifest record."""
        return {"video_id": self.video_id, "path": self.path, "reason": self.reason}


def failures_path(base: BaseConfig) -> Path:
    """The failure manifest of the dataset (`cache/<dataset>/decode_failures.jsonl`)."""
    return base.dataset_cache / MANIFEST_NAME


def write_failures(path: Path, failures: Sequence[Failure]) -> None:
    """Write the manifest atomically, sorted by video id (an empty file when every video was stored)."""
    ordered = sorted(failures, key=lambda failure: failure.video_id)
    atomic_write_text(path, "".join(json.dumps(failure.to_json()) + "\n" for failure in ordered))


def read_failures(base: BaseConfig) -> dict[str, Failure]:
    """Video id -> failure, from the manifest (empty when there is none)."""
    path = failures_path(base)
    if not path.is_file():
        return {}
    failures = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            failures[str(record["video_id"])] = Failure(str(record["video_id"]), str(record["path"]), record["reason"])
        except (ValueError, KeyError, TypeError) as exc:
            message = f"{path}:{number}: not a failure record ({exc}); re-run `python pipeline.py decode`"
            raise PipelineError(message) from exc
    return failures


@dataclass(frozen=True)
class AvailableQueries:
    """The queries (of one split, or all) whose video is available, and what was left out."""

    queries: list[Query]  # kept, in annotation order
    queries_total: int  # before leaving any out
    unavailable: list[str]  # ids of the videos left out (sorted)
    manifest: Path

    @property
    def video_ids(self) -> list[str]:
        """The kept videos, in order of first appearance."""
        return list(dict.fromkeys(query.video_id for query in self.queries))

    def counts(self) -> dict[str, int]:
        """What every metrics file records."""
        return {
            "queries_total": self.queries_total,
            "queries_evaluated": len(self.queries),
            "videos_unavailable": len(self.unavailable),
        }

    def log(self, stage: str, what: str) -> None:
        """Tell on stderr what was left out (nothing when every video is available)."""
        if self.unavailable:
            print(
                f"{stage}: {what}: left out {self.queries_total - len(self.queries)} of {self.queries_total} queries "
                f"whose {len(self.unavailable)} video(s) decode could not store (e.g. {self.unavailable[:3]}); "
                f"reasons in {self.manifest}",
                file=sys.stderr,
                flush=True,
            )


def available_queries(base: BaseConfig, split: str | None = None, key: str = "the split") -> AvailableQueries:
    """The annotated queries (of `split`, or of every split) whose video is not in the failure manifest.

    Args:
        base: where the annotations and the manifest are.
        split: one split, or None for all of them.
        key: the params key that named `split`, for the error when the annotations have no such split.
    """
    everything = read_queries(base.annotations_path)
    queries = everything if split is None else [query for query in everything if query.split == split]
    if not queries:
        present = list(dict.fromkeys(query.split for query in everything))
        raise PipelineError(
            f"{base.annotations_path} has no queries of split {split!r} (its splits: {', '.join(present) or 'none'}); "
            f"set {key} to one of them"
        )
    failures = read_failures(base)
    kept = [query for query in queries if query.video_id not in failures]
    unavailable = sorted({query.video_id for query in queries if query.video_id in failures})
    if not kept:
        raise PipelineError(
            f"none of the {len(unavailable)} videos of {'split ' + repr(split) if split else 'the annotations'} "
            f"could be decoded; see the reasons in {failures_path(base)}"
        )
    return AvailableQueries(kept, len(queries), unavailable, failures_path(base))
