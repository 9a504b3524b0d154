"""The unified annotation schema: one JSON object per line, one line per query (see DESIGN.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stages.data.errors import PipelineError
from stages.data.files import atomic_write_text

VIDEO_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class VideoPart:
    """One source video file that a merged video plays from `offset` seconds on (see `Query.parts`)."""

    video_id: str  # the file's id (its name without extension)
    offset: float  # where it starts on the merged video's timeline, in seconds
    duration: float  # its duration in seconds

    def to_json(self) -> dict:
        """The JSON object written in a query's `parts` list."""
        return {"video_id": self.video_id, "offset": self.offset, "duration": self.duration}


@dataclass(frozen=True)
class Query:
    """One text query and the moment(s) of its video that it describes.

    `parts` is empty for an ordinary video (the file `<video_id>.<ext>`). A merged video (the QVHighlights PRVR
    re-split) has no file of its own: it is its parts played one after the other, and `duration` and `moments`
    are on that concatenated timeline. The key `parts` is written only when it is not empty.
    """

    query_id: str
    query: str
    video_id: str
    duration: float
    moments: tuple[tuple[float, float], ...]
    split: str
    parts: tuple[VideoPart, ...] = ()

    def to_json(self) -> dict:
        """The JSON object written on one line of the unified file."""
        obj = {
            "query_id": self.query_id,
            "query": self.query,
            "video_id": self.video_id,
            "duration": self.duration,
            "moments": [list(m) for m in self.moments],
            "split": self.split,
        }
        if self.parts:
            obj["parts"] = [part.to_json() for part in self.parts]
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> Query:
        """Inverse of `to_json`."""
        return cls(
            query_id=str(obj["query_id"]),
            query=str(obj["query"]),
            video_id=str(obj["video_id"]),
            duration=float(obj["duration"]),
            moments=tuple((float(s), float(e)) for s, e in obj["moments"]),
            split=str(obj["split"]),
            parts=tuple(
                VideoPart(str(p["video_id"]), float(p["offset"]), float(p["duration"])) for p in obj.get("parts", ())
            ),
        )


def is_valid_video_id(video_id: str) -> bool:
    """A video id is a plain file-name stem: `[A-Za-z0-9_.-]+`, never `.`/`..` or a path."""
    return bool(VIDEO_ID_PATTERN.match(video_id)) and video_id not in {".", ".."} and ".." not in video_id


def write_queries(path: str | Path, queries: Iterable[Query]) -> None:
    """Write unified annotations atomically (a temporary file, then a rename)."""
    atomic_write_text(path, "".join(json.dumps(q.to_json(), ensure_ascii=False) + "\n" for q in queries))


def read_queries(path: str | Path, split: str | None = None) -> list[Query]:
    """Read unified annotations, optionally keeping one split."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; run `python pipeline.py prepare` first")
    queries = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                query = Query.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise PipelineError(f"{path}:{number}: not a unified annotation line ({exc})") from exc
            if split is None or query.split == split:
                queries.append(query)
    return queries


def video_durations(queries: Iterable[Query]) -> dict[str, float]:
    """Video id to duration, in order of first appearance."""
    durations: dict[str, float] = {}
    for query in queries:
        durations.setdefault(query.video_id, query.duration)
    return durations
