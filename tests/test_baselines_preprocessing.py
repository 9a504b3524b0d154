"""Official MS-SL/GMMFormer preprocessing and batching, checked against the fixtures of the official code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.data.errors import PipelineError
from stages.data.schema import Query
from stages.models.baselines.data import (
    QueryDataset,
    VideoDataset,
    VideoQueryDataset,
    collate_queries,
    collate_train,
    collate_videos,
)
from stages.models.baselines.preprocessing import (
    PreprocessConfig,
    bin_edges,
    bin_ranges,
    clip_tensor,
    frame_ranges,
    frame_sequence,
    query_tokens,
)

CFG = PreprocessConfig(map_size=8, max_ctx_l=16, max_desc_l=30)


@pytest.fixture(scope="module")
def io(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "baselines_official" / "mssl_shared_io.npz") as npz:
        return {key: npz[key] for key in npz.files}


def _split(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(counts)[:-1])


@pytest.fixture(scope="module")
def sources(io: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Query]]:
    videos = {f"vid{i}": x for i, x in enumerate(_split(io["raw_video_feats"], io["raw_video_num_frames"]))}
    texts, queries, seen = {}, [], {}
    for tokens, video in zip(_split(io["raw_query_feats"], io["raw_query_num_tokens"]), io["query_video"], strict=True):
        k = seen[video] = seen.get(video, -1) + 1
        qid = f"vid{video}#enc#{k}"
        texts[qid] = tokens
        queries.append(Query(qid, "text", f"vid{video}", 10.0, (), "train"))
    return videos, texts, queries


def test_bin_tables_match_official(io: dict[str, np.ndarray]) -> None:
    for size in (8, 12, 32):
        for t, expected in zip(io[f"bins_clip_M{size}_T"], io[f"bins_clip_M{size}"], strict=True):
            np.testing.assert_array_equal(bin_ranges(bin_edges(int(t), size, "float32")), expected)
    for size in (16, 128):
        for t, expected in zip(io[f"bins_frame_L{size}_T"], io[f"bins_frame_L{size}"], strict=True):
            np.testing.assert_array_equal(frame_ranges(int(t), PreprocessConfig(max_ctx_l=size)), expected)


def test_edge_precision_matters_for_twelve_bins() -> None:
    """float32 and float64 edges differ at T = 54 for M = 12: the clip path must use float32."""
    assert not np.array_equal(bin_edges(54, 12, "float32"), bin_edges(54, 12, "float64"))
    assert np.array_equal(bin_edges(54, 32, "float32"), bin_edges(54, 32, "float64"))


def test_last_frame_quirk_is_switchable() -> None:
    x = np.arange(37, dtype=np.float64)[:, None] * np.ones((1, 3))
    official = clip_tensor(x, PreprocessConfig(map_size=8, normalize=False))
    fixed = clip_tensor(x, PreprocessConfig(map_size=8, normalize=False, clamp_last_edge=False))
    assert official[-1, 0] == pytest.approx(np.mean(np.arange(32, 36)))  # frame 36 is never used
    assert fixed[-1, 0] == pytest.approx(np.mean(np.arange(32, 37)))


def test_preprocessed_inputs_match_official(io: dict[str, np.ndarray], sources: tuple) -> None:
    videos, texts, _ = sources
    for index, video_id in enumerate(videos):
        frames = frame_sequence(videos[video_id], CFG)
        np.testing.assert_allclose(clip_tensor(videos[video_id], CFG), io["pre_clip_feats"][index], atol=1e-6)
        np.testing.assert_allclose(frames, io["pre_frame_feats"][index, : len(frames)], atol=1e-6)
        assert len(frames) == io["pre_frame_mask"][index].sum()
    for index, tokens in enumerate(texts.values()):
        kept = query_tokens(tokens, CFG)
        np.testing.assert_allclose(kept, io["pre_query_feats"][index, : len(kept)], atol=1e-6)
        assert len(kept) == min(len(tokens), 30) == io["pre_query_mask"][index].sum()
    # the l2 eps is added to the norm: a lone tiny frame keeps a norm of about 0.990, not 1
    assert np.linalg.norm(frame_sequence(videos["vid2"], CFG)[1]) == pytest.approx(0.990, abs=1e-3)


def test_collates_reproduce_official_batches(io: dict[str, np.ndarray], sources: tuple) -> None:
    videos, texts, queries = sources
    query_ids = [q.query_id for q in queries]
    train = VideoQueryDataset(queries, videos, texts, CFG)
    batch = collate_train([train[i] for i in range(len(train))])
    assert [int(v[3:]) for v in batch.videos.video_ids] == io["order_train_videos"].tolist()
    assert [query_ids.index(q) for q in batch.queries.query_ids] == io["order_train_queries"].tolist()
    assert batch.queries.labels.tolist() == [
        batch.videos.video_ids.index(q.split("#")[0]) for q in batch.queries.query_ids
    ]

    evaluation = collate_queries(list(QueryDataset(query_ids, texts, CFG)), sort_by_length=True)
    assert [query_ids.index(q) for q in evaluation.query_ids] == io["order_eval_queries"].tolist()
    in_order = collate_queries(list(QueryDataset(query_ids, texts, CFG)))
    assert in_order.query_ids == query_ids
    np.testing.assert_allclose(in_order.query_feats.numpy(), io["pre_query_feats"], atol=1e-6)
    np.testing.assert_array_equal(in_order.query_mask.numpy(), io["pre_query_mask"])

    eval_videos = collate_videos(list(VideoDataset(list(videos), videos, CFG)))
    np.testing.assert_allclose(eval_videos.frame_feats.numpy(), io["pre_frame_feats"], atol=1e-6)
    np.testing.assert_array_equal(eval_videos.frame_mask.numpy(), io["pre_frame_mask"])


def test_missing_features_name_the_item(sources: tuple) -> None:
    videos, texts, _ = sources
    with pytest.raises(PipelineError, match="'vid9'"):
        VideoDataset(["vid9"], videos, CFG)[0]
    with pytest.raises(PipelineError, match="'nope'"):
        QueryDataset(["nope"], texts, CFG)[0]
