"""The queries of one split and their videos: what ProPy trains and is evaluated on."""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.data.available import AvailableQueries, available_queries
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.frame_cache import FrameCache
from stages.data.schema import Query


@dataclass(frozen=True)
class Corpus:
    """The available videos of one split (in order of first appearance) and their queries."""

    split: str
    video_ids: list[str]
    queries: list[Query]
    counts: dict[str, int] = field(default_factory=dict)  # queries_total, queries_evaluated, videos_unavailable

    def captions(self) -> list[list[str]]:
        """All captions of each video, in query order."""
        index = {video_id: i for i, video_id in enumerate(self.video_ids)}
        captions: list[list[str]] = [[] for _ in self.video_ids]
        for query in self.queries:
            captions[index[query.video_id]].append(query.query)
        return captions


def load_corpus(base: BaseConfig, split: str, key: str = "the split", stage: str = "") -> Corpus:
    """The queries of `split` whose video is available (see `stages.data.available`), all in the frame cache.

    `key` names the params key that chose the split (for errors); a non-empty `stage` logs what was left out.
    """
    available = available_queries(base, split, key)
    if stage:
        available.log(stage, f"split {split!r}")
    check_cached(base, available)
    return Corpus(split, available.video_ids, available.queries, available.counts())


def check_cached(base: BaseConfig, available: AvailableQueries) -> None:
    """Every available video must be in the frame cache (else `decode` has not run on these annotations)."""
    cache = FrameCache(base.frames_path)
    missing = [v for v in available.video_ids if v not in cache]
    if missing:
        raise PipelineError(
            f"{len(missing)} annotated video(s) are neither in the frame cache {base.frames_path} nor in the failure "
            f"manifest {available.manifest} (e.g. {missing[:3]}); run `python pipeline.py decode`"
        )
