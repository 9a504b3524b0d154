"""The `search` command: texts -> each query's best videos in an index, with the moment, score and thumbnail.

    python pipeline.py search INDEX_DIR "a man opens the door"                 # a table of the 10 best videos
    python pipeline.py search INDEX_DIR "a man opens the door" --json --top-k 5 --min-score 0.3
    python pipeline.py search INDEX_DIR "a red square" --video 'lectures/week1/*'   # only matching files
    python pipeline.py search INDEX_DIR --queries queries.txt > results.jsonl   # one query per line in, JSONL out

The model is the one the index was built with (index.json says where it is; its sha256 is checked). Videos are
ranked with the model's own similarity, exactly as evaluation ranks them (`stages/search/engine.py`). A result's
`start`/`end` (seconds) is the window of the video's best unit: a ProPy event of the pyramid, an MS-SL proposal, a
GMMFormer clip, the input row a Prototypes prototype attends most, a frame for frozen-CLIP MIL.

What the score means: the model's similarity of the query and the video, the number evaluation ranks by. For ProPy
and frozen-CLIP MIL it is the cosine similarity of the query and the video's best unit (-1..1; ProPy's logits are
this times CLIP's logit scale, which does not change the ranking; with `normalize_eval: false` the units keep their
norm); for the MS-SL family it is the model's weighted sum of cosines (e.g. 0.7 x best clip + 0.3 x frame branch).
It ranks videos for one query; it is not a probability, and a useful `--min-score` depends on the model and the
data: look at the scores of known matches first.
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.errors import PipelineError
from stages.search.ann import ANN_FILE, AnnIndex
from stages.search.engine import Match, SearchEngine
from stages.search.index import IndexLayout, SearchConfig, read_manifest
from stages.search.models import ModelChoice, load_search_model
from stages.search.store import UnitStore, VideoRecord

QUERY_BATCH = 256


@dataclass(frozen=True)
class Hit:
    """One result: a video and its best moment."""

    rank: int  # 1-based
    video_id: str
    path: str  # the video file
    start: float  # seconds
    end: float  # seconds
    score: float  # the model's similarity (see the module docstring)
    thumbnail: str  # JPEG of the moment
    unit: int  # the moment's unit within the video

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `--json`."""
        return asdict(self)


class Searcher:
    """An opened index with its model: `search(texts)` gives each text's hits. Safe to share between threads."""

    def __init__(self, root: str | Path, config: SearchConfig) -> None:
        self.layout = IndexLayout(Path(root).resolve())
        manifest = read_manifest(self.layout.root)
        self.video_dir = Path(manifest["video_dir"])
        choice = ModelChoice.from_dict(manifest["model"], f"{self.layout.manifest}:model")
        self.model = load_search_model(choice, config.device, config.batch_frames)
        recorded = {k: v for k, v in manifest["identity"].items() if k != "frames"}
        if recorded != self.model.identity:
            raise PipelineError(
                f"the model files of {self.layout.root} changed since it was built (index.json `model` says where "
                "they are); re-index with `python pipeline.py index`"
            )
        store = UnitStore.open(self.layout.store)
        ann_path = self.layout.store / ANN_FILE
        ann = AnnIndex(ann_path, config.ann) if ann_path.is_file() else None
        self.store = store
        self.engine = SearchEngine(store, self.model.score_fn, config.scan, ann)
        self._lock = threading.Lock()

    @property
    def videos(self) -> list[VideoRecord]:
        """The indexed videos, in store order."""
        return self.store.videos

    def search(
        self, texts: list[str], top_k: int = 10, min_score: float | None = None, video_glob: str | None = None
    ) -> list[list[Hit]]:
        """Each text's best videos (at most `top_k`, at least `min_score`, among files matching `video_glob`)."""
        if top_k < 1:
            raise PipelineError(f"--top-k must be at least 1, got {top_k}")
        if any(not text.strip() for text in texts):
            raise PipelineError("a query is empty")
        subset = self._matching(video_glob)
        with self._lock:
            results = []
            for start in range(0, len(texts), QUERY_BATCH):
                queries = self.model.encode_queries(texts[start : start + QUERY_BATCH])
                results += self.engine.search(queries, top_k, subset, min_score)
        return [[self._hit(rank, match) for rank, match in enumerate(matches, 1)] for matches in results]

    def _matching(self, video_glob: str | None) -> np.ndarray | None:
        if video_glob is None:
            return None
        chosen = [
            i
            for i, record in enumerate(self.store.videos)
            if fnmatch.fnmatchcase(record.path, video_glob) or fnmatch.fnmatchcase(record.video_id, video_glob)
        ]
        if not chosen:
            raise PipelineError(f"no indexed video matches --video {video_glob!r} (matched against relative paths)")
        return np.asarray(chosen, dtype=np.int64)

    def _hit(self, rank: int, match: Match) -> Hit:
        record = self.store.videos[match.video]
        start, end = (float(t) for t in self.store.windows[match.unit])
        frame = int(self.store.thumbs[match.unit])
        return Hit(
            rank=rank,
            video_id=record.video_id,
            path=str(self.video_dir / record.path),
            start=round(start, 3),
            end=round(end, 3),
            score=match.score,
            thumbnail=str(self.layout.thumbs / record.key / f"{frame}.jpg"),
            unit=match.unit - int(self.store.offsets[match.video]),
        )


def read_query_file(path: str | Path) -> list[str]:
    """One query per non-empty line of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"query file {path} does not exist")
    queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not queries:
        raise PipelineError(f"query file {path} holds no query")
    return queries
