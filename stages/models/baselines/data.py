"""Datasets and collate functions of the baselines, over any `Mapping[id, array]` of raw features.

Feature sources are the feature store's views (`FeatureStore.videos` / `.texts`) or plain dicts of arrays (tests).
- Training (`VideoQueryDataset`): one item per video with all of its queries; the collate sorts the videos by frame
  rows (descending, stable), pads frames with a mask, stacks the clip tensors and flattens the queries of each
  video, contiguous and in annotation order, with `labels` = the batch index of their video (official order).
- Evaluation (`VideoDataset`, `QueryDataset`): videos and queries keep their order (the evaluator pairs rows by
  position); the official loader's sort of query batches by token count is available (`sort_by_length`) and does
  not change any score, since padded tokens are masked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Self

import numpy as np
import torch
from torch.utils.data import Dataset

from stages.data.errors import PipelineError
from stages.data.schema import Query
from stages.models.baselines.preprocessing import PreprocessConfig, query_tokens

FeatureSource = Mapping[str, np.ndarray]


class Movable:
    """Mixin of the batch dataclasses: `batch.to(device)` moves every tensor field (nested batches too)."""

    def to(self, device: torch.device | str) -> Self:
        """A copy with every tensor on `device`."""
        moved = {}
        for item in fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            moved[item.name] = value.to(device) if isinstance(value, (torch.Tensor, Movable)) else value
        return replace(self, **moved)  # type: ignore[type-var]


@dataclass
class VideoBatch(Movable):
    """Preprocessed videos: clip tensors and padded frame sequences."""

    video_ids: list[str]
    clip_feats: torch.Tensor  # [B, M, d_v]
    frame_feats: torch.Tensor  # [B, L_f, d_v], zero-padded
    frame_mask: torch.Tensor  # [B, L_f] float, 1 = real frame
    clip_sizes: torch.Tensor | None = None  # [B, M] float: frames merged into each clip (MSC's token merging)
    frame_labels: torch.Tensor | None = None  # [B, L_f] long: the clip each frame row was merged into (MSC)


@dataclass
class QueryBatch(Movable):
    """Preprocessed queries: padded token features."""

    query_ids: list[str]
    query_feats: torch.Tensor  # [N, L_q, d_t], zero-padded
    query_mask: torch.Tensor  # [N, L_q] float, 1 = real token
    labels: torch.Tensor | None = None  # [N] batch index of each query's video (training batches only)

    def last_tokens(self) -> torch.Tensor:
        """[N, d_t] the feature of each query's last real token (CLIP's EOT: the sentence embedding)."""
        last = self.query_mask.sum(dim=1).long() - 1
        return self.query_feats[torch.arange(len(last), device=last.device), last]


@dataclass
class TrainBatch(Movable):
    """Videos with all of their queries (queries of one video are contiguous)."""

    videos: VideoBatch
    queries: QueryBatch

    def padded(self, frames: int, tokens: int) -> TrainBatch:
        """This batch with frame sequences zero-padded (and masked) to `frames` rows and queries to `tokens` tokens:
        what the collate gives when the batch also holds longer items."""
        v, q = self.videos, self.queries
        videos = replace(v, frame_feats=_pad_rows(v.frame_feats, frames), frame_mask=_pad_rows(v.frame_mask, frames))
        queries = replace(q, query_feats=_pad_rows(q.query_feats, tokens), query_mask=_pad_rows(q.query_mask, tokens))
        return TrainBatch(videos, queries)


def _pad_rows(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad axis 1 of [N, L, ...] to `length`."""
    if tensor.shape[1] == length:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, length - tensor.shape[1]))


def pad_sequences(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad [L_i, d] arrays to [N, max L_i, d] with a float 0/1 mask [N, max L_i]."""
    length = max(len(a) for a in arrays)
    feats = torch.zeros(len(arrays), length, arrays[0].shape[-1], dtype=torch.float32)
    mask = torch.zeros(len(arrays), length, dtype=torch.float32)
    for row, array in enumerate(arrays):
        feats[row, : len(array)] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        mask[row, : len(array)] = 1.0
    return feats, mask


def _lookup(source: FeatureSource, key: str, what: str) -> np.ndarray:
    try:
        array = source[key]
    except KeyError:
        raise PipelineError(
            f"no {what} features for {key!r} in the feature store; re-run the `features` stage"
        ) from None
    if array.ndim != 2 or len(array) == 0:
        raise PipelineError(f"{what} features of {key!r} have shape {array.shape}; expected a non-empty [T, D] array")
    return array


@dataclass
class VideoItem:
    """One preprocessed video."""

    video_id: str
    clip: np.ndarray  # [M, d_v]
    frames: np.ndarray  # [L_f, d_v]
    clip_sizes: np.ndarray | None = None  # [M] (models whose preprocessing merges frames into clips)
    frame_labels: np.ndarray | None = None  # [L_f]


@dataclass
class QueryItem:
    """One preprocessed query."""

    query_id: str
    tokens: np.ndarray  # [L_q, d_t]


class VideoDataset(Dataset):
    """Evaluation videos, in the given order."""

    def __init__(self, video_ids: Sequence[str], videos: FeatureSource, cfg: PreprocessConfig) -> None:
        self.video_ids = list(video_ids)
        self.videos = videos
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> VideoItem:
        video_id = self.video_ids[index]
        raw = _lookup(self.videos, video_id, "video")
        return VideoItem(video_id, **self.cfg.video_inputs(raw))


class QueryDataset(Dataset):
    """Evaluation queries, in the given order."""

    def __init__(self, query_ids: Sequence[str], texts: FeatureSource, cfg: PreprocessConfig) -> None:
        self.query_ids = list(query_ids)
        self.texts = texts
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.query_ids)

    def __getitem__(self, index: int) -> QueryItem:
        query_id = self.query_ids[index]
        return QueryItem(query_id, query_tokens(_lookup(self.texts, query_id, "text"), self.cfg))


@dataclass
class TrainItem:
    """One training video with all of its queries."""

    video: VideoItem
    queries: list[QueryItem]


class VideoQueryDataset(Dataset):
    """Training items: one per video (first-appearance order), each with all of its queries (annotation order)."""

    def __init__(
        self, queries: Sequence[Query], videos: FeatureSource, texts: FeatureSource, cfg: PreprocessConfig
    ) -> None:
        self.query_ids_by_video: dict[str, list[str]] = {}
        for query in queries:
            self.query_ids_by_video.setdefault(query.video_id, []).append(query.query_id)
        self.video_set = VideoDataset(list(self.query_ids_by_video), videos, cfg)
        self.texts = texts
        self.cfg = cfg

    @property
    def video_ids(self) -> list[str]:
        """Training videos in item order."""
        return self.video_set.video_ids

    def frame_rows(self) -> list[int]:
        """Rows of each item's frame sequence (what the training collate sorts by), read from the feature shapes."""
        videos = self.video_set.videos
        lengths = [videos.shape(v)[0] if hasattr(videos, "shape") else len(videos[v]) for v in self.video_ids]
        return [min(length, self.cfg.max_ctx_l) for length in lengths]

    def __len__(self) -> int:
        return len(self.video_set)

    def __getitem__(self, index: int) -> TrainItem:
        video = self.video_set[index]
        queries = [
            QueryItem(qid, query_tokens(_lookup(self.texts, qid, "text"), self.cfg))
            for qid in self.query_ids_by_video[video.video_id]
        ]
        return TrainItem(video, queries)


def collate_videos(items: Sequence[VideoItem]) -> VideoBatch:
    """Stack clip tensors and pad frame sequences, keeping the item order."""
    frames, mask = pad_sequences([item.frames for item in items])
    clips = torch.from_numpy(np.stack([item.clip for item in items]).astype(np.float32))
    merged = {}
    if items[0].clip_sizes is not None:
        merged["clip_sizes"] = torch.from_numpy(np.stack([item.clip_sizes for item in items]).astype(np.float32))
        merged["frame_labels"] = torch.from_numpy(np.stack([item.frame_labels for item in items]).astype(np.int64))
    return VideoBatch([item.video_id for item in items], clips, frames, mask, **merged)


def query_order(items: Sequence[QueryItem]) -> list[int]:
    """The official evaluation row order: token count descending, ties in input order."""
    return sorted(range(len(items)), key=lambda i: -len(items[i].tokens))


def collate_queries(items: Sequence[QueryItem], sort_by_length: bool = False) -> QueryBatch:
    """Pad query tokens, keeping the item order (the evaluator pairs rows by position), or sorted by token count
    (descending, stable) as the official evaluation loader does (`sort_by_length`)."""
    order = query_order(items) if sort_by_length else range(len(items))
    items = [items[i] for i in order]
    feats, mask = pad_sequences([item.tokens for item in items])
    return QueryBatch([item.query_id for item in items], feats, mask)


def collate_train(items: Sequence[TrainItem]) -> TrainBatch:
    """The official training batch: videos sorted by frame rows (descending, stable), their queries flattened."""
    items = sorted(items, key=lambda item: -len(item.video.frames))
    videos = collate_videos([item.video for item in items])
    queries = [query for item in items for query in item.queries]
    labels = torch.tensor([index for index, item in enumerate(items) for _ in item.queries], dtype=torch.long)
    feats, mask = pad_sequences([query.tokens for query in queries])
    return TrainBatch(videos, QueryBatch([q.query_id for q in queries], feats, mask, labels))
