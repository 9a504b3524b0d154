"""Converters from each dataset's native annotation format to unified `Query` records.

Every format has a reader that turns a file into raw candidates (native values, not yet checked) or `BadLine`s
for lines it cannot even take apart; one validation function (`_to_query`) then checks every candidate against
the unified schema, and `convert` adds the checks that span lines and files (duplicate query ids, a video given
two durations). Every problem is collected with its file, line and reason; nothing is dropped silently.

Formats (the keys of `FORMATS`):
- `tvr`: `tvr_*_release.jsonl`, one object per line: `desc_id`, `desc`, `vid_name`, `duration`, `ts` ([start, end];
  absent in TVR's public test file). The synthetic generator writes this format too.
- `propy`: ProPy's converted jsonl: the same fields, where `ts` may also be a list of windows or absent.
- `qvhighlights`: `highlight_{train,val,test}_release.jsonl`: `qid`, `query`, `vid`, `duration`, `relevant_windows`
  (absent in test). With `merge_sources`, the PRVR re-split of the Prototypes paper (see `merge_sources`).
- `activitynet`: ActivityNet Captions `train.json` / `val_1.json`: `{video_id: {duration, timestamps, sentences}}`;
  query ids are `<video_id>#<k>` (k = the sentence's index); the line reported is the line of the video's key.
- `charades`: Charades-STA `charades_sta_{train,test}.txt`: `<video_id> <start> <end>##<sentence>`; query ids are
  `<video_id>#<k>` (k counts the video's lines in the file); durations from the Charades CSV tables
  (`Charades_v1_{train,test}.csv`, columns `id` and `length`) given to `read_durations`.
- `mscaption`: the MS-SL caption txt: `<video_id>#enc#<k> <sentence>` (single space). The caption id is kept as the
  query id (it keys MS-SL's text features). The release has no durations and no timestamps: durations come from a
  CSV table (as for Charades; required, since every video needs one), moments are left empty (PRVR needs none).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from stages.data.errors import PipelineError
from stages.data.schema import Query, VideoPart, is_valid_video_id


@dataclass(frozen=True)
class Location:
    """Where a record comes from: file, 1-based line, the item inside the line if several share it, raw text."""

    file: str
    line: int
    text: str
    item: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" + (f" [{self.item}]" if self.item else "")


@dataclass(frozen=True)
class BadLine:
    """A malformed record and why it was rejected."""

    where: Location
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"

    def to_json(self) -> dict:
        """The JSON object of the dropped-lines file."""
        where = self.where
        return {"file": where.file, "line": where.line, "item": where.item, "reason": self.reason, "text": where.text}


@dataclass(frozen=True)
class RawQuery:
    """One query as a native file gives it: values not yet checked (`None` where the format has none)."""

    query_id: Any
    query: Any
    video_id: Any
    duration: Any
    moments: Any


Candidate = tuple[Location, RawQuery]
Reader = Callable[[Path, Mapping[str, float]], Iterator[Candidate | BadLine]]


@dataclass
class Conversion:
    """The valid queries (in file order, splits in the order given) and every rejected record."""

    queries: list[Query] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)


class _Invalid(ValueError):
    """A value that breaks the unified schema (the message is the reason reported)."""


# --------------------------------------------------------------------------------------------------------------
# Validation shared by every format
# --------------------------------------------------------------------------------------------------------------


def _number(value: Any, what: str) -> float:
    """A finite float from a JSON number or a numeric string."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(f"{what} {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise _Invalid(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise _Invalid(f"{what} {value!r} is not finite")
    return number


def _moments(value: Any, duration: float, tolerance: float) -> tuple[tuple[float, float], ...]:
    """`None`, one `[start, end]` or a list of them, each checked against [0, duration] (clipped within tolerance)."""
    if value is None:
        return ()
    if isinstance(value, list | tuple) and len(value) == 2 and not any(isinstance(v, list | tuple) for v in value):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(w, list | tuple) and len(w) == 2 for w in value):
        raise _Invalid(f"moments {value!r} are not [start, end] or a list of [start, end]")
    moments = []
    for window in value:
        start, end = _number(window[0], "moment start"), _number(window[1], "moment end")
        if start > end:
            raise _Invalid(f"moment [{start:g}, {end:g}] starts after it ends")
        if start < -tolerance or end > duration + tolerance:
            raise _Invalid(f"moment [{start:g}, {end:g}] is outside [0, {duration:g}] (the video's duration)")
        moments.append((max(start, 0.0), min(end, duration)))
    return tuple(moments)


def _to_query(raw: RawQuery, split: str, tolerance: float) -> Query:
    """Check one raw query against the unified schema (see DESIGN.md) and build its record."""
    query_id = raw.query_id
    if isinstance(query_id, bool) or not isinstance(query_id, str | int) or not str(query_id).strip():
        raise _Invalid(f"query id {query_id!r} is not a non-empty string or integer")
    if "/" in str(query_id):
        raise _Invalid(f"query id {query_id!r} contains '/' (query ids name HDF5 datasets)")
    if not isinstance(raw.query, str):
        raise _Invalid(f"query {raw.query!r} is not a string")
    if not raw.query.strip():
        raise _Invalid("empty query")
    video_id = raw.video_id
    if not isinstance(video_id, str) or not is_valid_video_id(video_id):
        raise _Invalid(f"bad video id {video_id!r}: it must match [A-Za-z0-9_.-]+ and not be or contain '..'")
    if raw.duration is None:
        raise _Invalid(f"unknown duration of video {video_id!r} (not given, or not in the durations table)")
    duration = _number(raw.duration, "duration")
    if duration <= 0:
        raise _Invalid(f"duration {duration:g} of video {video_id!r} is not > 0")
    moments = _moments(raw.moments, duration, tolerance)
    return Query(str(query_id).strip(), raw.query.strip(), video_id, duration, moments, split)


# --------------------------------------------------------------------------------------------------------------
# Readers, one per native format
# --------------------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text ({exc}); re-encode it as UTF-8") from exc


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text without line end) of every non-blank line."""
    for number, text in enumerate(_read_text(path).splitlines(), start=1):
        if text.strip():
            yield number, text


@dataclass(frozen=True)
class JsonlFields:
    """The native field names of a one-query-per-line JSON format."""

    query_id: str
    query: str
    video_id: str
    duration: str
    moments: str  # optional: absent means no moments


TVR_FIELDS = JsonlFields("desc_id", "desc", "vid_name", "duration", "ts")
QVHIGHLIGHTS_FIELDS = JsonlFields("qid", "query", "vid", "duration", "relevant_windows")


def _read_jsonl(path: Path, durations: Mapping[str, float], fields: JsonlFields) -> Iterator[Candidate | BadLine]:
    required = (fields.query_id, fields.query, fields.video_id, fields.duration)
    for number, text in _lines(path):
        where = Location(str(path), number, text)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield BadLine(where, f"unparsable JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield BadLine(where, "not a JSON object")
            continue
        missing = [name for name in required if name not in obj]
        if missing:
            yield BadLine(where, f"missing field(s) {', '.join(missing)}")
            continue
        values = [obj[name] for name in required]
        yield where, RawQuery(*values, moments=obj.get(fields.moments))


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_object_members(text: str) -> Iterator[tuple[int, str, Any]]:
    """(offset of the key, key, value) of each member of a top-level JSON object, duplicate keys included."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text).end()
    if not text.startswith("{", pos):
        raise json.JSONDecodeError("expected a JSON object", text, pos)
    pos = _WHITESPACE.match(text, pos + 1).end()
    while not text.startswith("}", pos):
        if not text.startswith('"', pos):
            raise json.JSONDecodeError("expected a key", text, pos)
        key_pos = pos
        key, pos = json.decoder.scanstring(text, pos + 1)
        pos = _WHITESPACE.match(text, pos).end()
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("expected ':'", text, pos)
        value, pos = decoder.raw_decode(text, _WHITESPACE.match(text, pos + 1).end())
        yield key_pos, key, value
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif not text.startswith("}", pos):
            raise json.JSONDecodeError("expected ',' or '}'", text, pos)
    if text[pos + 1 :].strip():
        raise json.JSONDecodeError("extra data after the object", text, pos + 1)


def _read_activitynet(path: Path, durations: Mapping[str, float]) -> Iterator[Candidate | BadLine]:
    text = _read_text(path)
    try:
        members = list(_json_object_members(text))
    except json.JSONDecodeError as exc:
        yield BadLine(Location(str(path), exc.lineno, ""), f"unparsable JSON ({exc.msg} at column {exc.colno})")
        return
    line, counted = 1, 0
    for key_pos, video_id, entry in members:
        line += text.count("\n", counted, key_pos)
        counted = key_pos
        where = Location(str(path), line, json.dumps({video_id: entry}, ensure_ascii=False), item=video_id)
        if not isinstance(entry, dict):
            yield BadLine(where, "the video's value is not a JSON object")
            continue
        missing = [name for name in ("duration", "timestamps", "sentences") if name not in entry]
        if missing:
            yield BadLine(where, f"missing field(s) {', '.join(missing)}")
            continue
        timestamps, sentences = entry["timestamps"], entry["sentences"]
        if not isinstance(timestamps, list) or not isinstance(sentences, list) or len(timestamps) != len(sentences):
            yield BadLine(where, "timestamps and sentences are not two lists of the same length")
            continue
        for k, (window, sentence) in enumerate(zip(timestamps, sentences, strict=True)):
            raw_text = json.dumps({"duration": entry["duration"], "timestamp": window, "sentence": sentence})
            item_where = Location(str(path), line, raw_text, item=f"{video_id}#{k}")
            yield item_where, RawQuery(f"{video_id}#{k}", sentence, video_id, entry["duration"], window)


def _read_charades(path: Path, durations: Mapping[str, float]) -> Iterator[Candidate | BadLine]:
    per_video: Counter[str] = Counter()
    for number, text in _lines(path):
        where = Location(str(path), number, text)
        head, sep, sentence = text.partition("##")
        fields = head.split()
        if not sep or len(fields) != 3:
            yield BadLine(where, "expected '<video_id> <start> <end>##<sentence>'")
            continue
        video_id, start, end = fields
        k = per_video[video_id]
        per_video[video_id] += 1
        yield where, RawQuery(f"{video_id}#{k}", sentence, video_id, durations.get(video_id), [start, end])


_CAPTION_ID = re.compile(r"([^#\s]+)#enc#\d+")


def _read_mscaption(path: Path, durations: Mapping[str, float]) -> Iterator[Candidate | BadLine]:
    for number, text in _lines(path):
        where = Location(str(path), number, text)
        caption_id, _, sentence = text.strip().partition(" ")
        if "\t" in caption_id:
            yield BadLine(where, "a TAB in the caption id: separate the id and the sentence by one space")
            continue
        match = _CAPTION_ID.fullmatch(caption_id)
        if not match:
            yield BadLine(where, f"caption id {caption_id!r} is not '<video_id>#enc#<k>'")
            continue
        video_id = match.group(1)
        yield where, RawQuery(caption_id, sentence, video_id, durations.get(video_id), None)


@dataclass(frozen=True)
class Format:
    """How to read one native format and which options apply to it."""

    read: Reader
    needs_durations: bool = False  # durations come from a separate table (`read_durations`)
    mergeable: bool = False  # video ids are `<source>_<start>_<end>` clips that `merge_sources` can join


FORMATS: dict[str, Format] = {
    "tvr": Format(partial(_read_jsonl, fields=TVR_FIELDS)),
    "propy": Format(partial(_read_jsonl, fields=TVR_FIELDS)),
    "qvhighlights": Format(partial(_read_jsonl, fields=QVHIGHLIGHTS_FIELDS), mergeable=True),
    "activitynet": Format(_read_activitynet),
    "charades": Format(_read_charades, needs_durations=True),
    "mscaption": Format(_read_mscaption, needs_durations=True),
}


# --------------------------------------------------------------------------------------------------------------
# Durations tables, the QVHighlights re-split, and the conversion of a set of files
# --------------------------------------------------------------------------------------------------------------


def read_durations(
    paths: Sequence[str | Path], id_column: str = "id", length_column: str = "length"
) -> tuple[dict[str, float], list[BadLine]]:
    """Video id -> duration (seconds) from CSV tables with a header (e.g. Charades_v1_train.csv: `id`, `length`).

    Returns the durations and the rows that could not be used (bad number, conflicting duplicate).
    """
    durations: dict[str, float] = {}
    first_row: dict[str, Location] = {}
    bad: list[BadLine] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise PipelineError(f"durations table {path} does not exist")
        reader = csv.DictReader(_read_text(path).splitlines())
        missing = [c for c in (id_column, length_column) if c not in (reader.fieldnames or [])]
        if missing:
            header = reader.fieldnames
            raise PipelineError(f"{path}: no column(s) {missing} in the header {header}; set duration_columns")
        for row in reader:
            video_id, length = row[id_column], row[length_column]
            where = Location(str(path), reader.line_num, f"{video_id},{length}")
            try:
                duration = _number(length, "length")
            except _Invalid as exc:
                bad.append(BadLine(where, str(exc)))
                continue
            if durations.setdefault(video_id, duration) != duration:
                bad.append(BadLine(where, f"video {video_id!r} has another length at {first_row[video_id]}"))
            first_row.setdefault(video_id, where)
    return durations, bad


def _source_of(video_id: str) -> tuple[str, float]:
    """(source video, start in the source) of a QVHighlights clip id `<source>_<start>_<end>`."""
    pieces = video_id.rsplit("_", 2)
    try:
        source, start, end = pieces[0], float(pieces[1]), float(pieces[2])
    except (IndexError, ValueError):
        source, start, end = "", math.nan, math.nan
    if not is_valid_video_id(source) or not start <= end:
        raise _Invalid(f"video id {video_id!r} is not '<source>_<start>_<end>', so its source cannot be merged")
    return source, start


def merge_sources(items: Sequence[tuple[Location, Query]]) -> tuple[list[tuple[Location, Query]], list[BadLine]]:
    """The QVHighlights PRVR re-split (Prototypes, ICCV 2025, appendix): one video per source video.

    QVHighlights videos are clips `<source>_<start>_<end>` cut from longer YouTube videos. Within each split, the
    clips of one source become one video: the clips in order of their start in the source, played one after the
    other (`Query.parts`), each query's moments shifted by its clip's offset, the duration the clips' sum.
    Queries and splits are unchanged. The merged video id is the source id, or `<source>_<split>` for a source
    whose clips fall in more than one split (so that a video id never names two different videos). The paper's
    split takes QVHighlights train as `train` and val as `test` (the official test has no windows): 2,214 / 474
    videos and 7,218 / 1,550 queries. Its exact construction is unpublished; this follows its description.
    """
    bad: list[BadLine] = []
    clips: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}  # (split, source) -> clip -> (start, duration)
    kept = []
    for where, query in items:
        try:
            source, start = _source_of(query.video_id)
        except _Invalid as exc:
            bad.append(BadLine(where, str(exc)))
            continue
        clips.setdefault((query.split, source), {})[query.video_id] = (start, query.duration)
        kept.append((where, query))
    splits_of_source = Counter(source for _, source in clips)
    # (split, clip) -> (merged video id, its parts, the clip's offset in it)
    merged_video: dict[tuple[str, str], tuple[str, tuple[VideoPart, ...], float]] = {}
    for (split, source), members in clips.items():
        merged_id = source if splits_of_source[source] == 1 else f"{source}_{split}"
        offset, parts = 0.0, []
        for clip, (_, duration) in sorted(members.items(), key=lambda kv: (kv[1][0], kv[0])):
            parts.append(VideoPart(clip, offset, duration))
            offset += duration
        for part in parts:
            merged_video[(split, part.video_id)] = (merged_id, tuple(parts), part.offset)
    merged = []
    for where, query in kept:
        merged_id, parts, offset = merged_video[(query.split, query.video_id)]
        moments = tuple((start + offset, end + offset) for start, end in query.moments)
        total = parts[-1].offset + parts[-1].duration
        merged.append((where, replace(query, video_id=merged_id, duration=total, moments=moments, parts=parts)))
    return merged, bad


def convert(
    files: Mapping[str, str | Path],
    fmt: str,
    durations: Mapping[str, float] | None = None,
    moment_tolerance: float = 0.0,
    merge_clip_sources: bool = False,
) -> Conversion:
    """Convert native annotation files (split -> file) of format `fmt` to unified queries, collecting every problem.

    Args:
        files: one native file per split, converted in this order.
        fmt: a key of `FORMATS`.
        durations: video id -> seconds, for the formats whose files have none (charades, mscaption).
        moment_tolerance: moments that overrun [0, duration] by at most this many seconds are clipped to it.
        merge_clip_sources: qvhighlights only: the PRVR re-split (`merge_sources`).
    """
    if fmt not in FORMATS:
        raise PipelineError(f"unknown annotation format {fmt!r}; choose one of {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    if spec.needs_durations and durations is None:
        raise PipelineError(f"format {fmt!r} has no video durations: set `durations` to CSV tables of them")
    if not spec.needs_durations and durations is not None:
        raise PipelineError(f"format {fmt!r} has its own durations: a durations table is only for charades/mscaption")
    if merge_clip_sources and not spec.mergeable:
        raise PipelineError(f"merging clips of one source is only for qvhighlights, not {fmt!r}")
    missing = [str(path) for path in files.values() if not Path(path).is_file()]
    if missing:
        raise PipelineError(
            f"annotation file(s) not found: {', '.join(missing)}; check the paths (params.yaml prepare.files; "
            "the synthetic dataset's files are written by `python pipeline.py synth`)"
        )

    bad: list[BadLine] = []
    items: list[tuple[Location, Query]] = []
    first_query: dict[str, Location] = {}
    first_duration: dict[str, tuple[float, Location]] = {}
    for split, path in files.items():
        for candidate in spec.read(Path(path), durations or {}):
            if isinstance(candidate, BadLine):
                bad.append(candidate)
                continue
            where, raw = candidate
            try:
                query = _to_query(raw, split, moment_tolerance)
            except _Invalid as exc:
                bad.append(BadLine(where, str(exc)))
                continue
            if query.query_id in first_query:
                reason = f"duplicate query id {query.query_id!r} (first at {first_query[query.query_id]})"
                bad.append(BadLine(where, reason))
                continue
            known, known_at = first_duration.setdefault(query.video_id, (query.duration, where))
            if known != query.duration:
                reason = f"video {query.video_id!r} has duration {query.duration:g} here but {known:g} at {known_at}"
                bad.append(BadLine(where, reason))
                continue
            first_query[query.query_id] = where
            items.append((where, query))
    if merge_clip_sources:
        items, merge_bad = merge_sources(items)
        bad.extend(merge_bad)
    return Conversion([query for _, query in items], bad)
