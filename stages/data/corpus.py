"""The queries of one split and their videos: what ProPy trains and is evaluated on."""

from __future__ import annotations

from dataclasses import dataclass

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.frame_cache import FrameCache
from stages.data.schema import Query, read_queries, video_durations


@dataclass(frozen=True)
class Corpus:
    """The videos of one split (in order of first appearance) and their queries."""

    split: str
    video_ids: list[str]
    queries: list[Query]

    def captions(self) -> list[list[str]]:
        """All captions of each video, in query order."""
        index = {video_id: i for i, video_id in enumerate(self.video_ids)}
        captions: list[list[str]] = [[] for _ in self.video_ids]
        for query in self.queries:
            captions[index[query.video_id]].append(query.query)
        return captions


def load_corpus(base: BaseConfig, split: str) -> Corpus:
    """The queries of `split` and their videos, which must all be in the frame cache."""
    queries = read_queries(base.annotations_path, split)
    if not queries:
        raise PipelineError(f"{base.annotations_path} has no queries of split {split!r}; check the split names")
    video_ids = list(video_durations(queries))
    cache = FrameCache(base.frames_path)
    missing = [v for v in video_ids if v not in cache]
    if missing:
        raise PipelineError(
            f"{len(missing)} of the {len(video_ids)} {split} videos are not in the frame cache {base.frames_path} "
            f"(e.g. {missing[:3]}); run `python pipeline.py decode` and read the reasons in "
            f"{base.dataset_cache / 'decode_failures.jsonl'}"
        )
    return Corpus(split, video_ids, queries)
