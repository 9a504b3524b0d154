"""The features stage: frozen-CLIP features of every cached frame and query, resumable, with provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStore
from stages.data.frame_cache import (
    FrameCache,
    FrameStorage,
    ensure_cache,
    new_staging_path,
    publish_video,
    write_video,
)
from stages.data.schema import Query, write_queries
from stages.extract.features import FeaturesConfig, run_features
from stages.models.clip_backbone import file_sha256, load_clip, normalize_frames, tokenize

VIDEO_FRAMES = {"vid_a": 5, "vid_b": 3}


@pytest.fixture()
def dataset(tmp_path, tiny_clip_weights) -> BaseConfig:
    base = BaseConfig(
        dataset="toy", cache_dir=str(tmp_path), clip_weights=str(tiny_clip_weights), clip_arch="vit-w128-l2-p32-r64"
    )
    ensure_cache(base.frames_path)
    rng = np.random.default_rng(0)
    for video_id, count in VIDEO_FRAMES.items():
        frames = rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
        staged = new_staging_path(base.frames_path, video_id)
        write_video(staged, frames, {}, FrameStorage())
        publish_video(staged, base.frames_path, video_id)
    queries = [
        Query("q1", "a red square moves left", "vid_a", 2.0, ((0.0, 1.0),), "train"),
        Query("q2", "a blue circle grows", "vid_b", 1.0, ((0.0, 0.5),), "test"),
    ]
    write_queries(base.annotations_path, queries)
    return base


def test_features_match_clip_and_resume(dataset: BaseConfig) -> None:
    path = run_features(dataset, FeaturesConfig(workers=0, batch_frames=2))
    store = FeatureStore(path)
    assert store.info.weights_sha256 == file_sha256(dataset.clip_weights)
    model, _ = load_clip(dataset.clip_weights)
    frames = torch.from_numpy(FrameCache(dataset.frames_path).read("vid_a"))
    with torch.no_grad():
        expected = model.encode_image(normalize_frames(frames)).numpy()
        ids = tokenize(["a red square moves left"], max_words=77)
        query = model.encode_text(torch.nn.functional.pad(ids, (0, 77 - ids.shape[1]))).numpy()[0]
    np.testing.assert_allclose(store.videos["vid_a"], expected, atol=1e-5)
    assert store.videos.shape("vid_b") == (3, 48)
    text = store.texts["q1"]
    assert text.shape == (len(tokenize(["a red square moves left"], 77)[0]), 48)
    np.testing.assert_allclose(text[-1], query, atol=1e-5)  # the EOT row is CLIP's query feature

    before = store.videos["vid_a"]
    store.close()
    run_features(dataset, FeaturesConfig(workers=0))  # nothing left to do: entries are kept, not rewritten
    assert FeatureStore(path).videos["vid_a"].tobytes() == before.tobytes()


def test_dask_workers_give_the_same_features(dataset: BaseConfig, tmp_path) -> None:
    in_process = FeatureStore(run_features(dataset, FeaturesConfig(workers=0))).videos["vid_b"]
    dataset.features_path().unlink()
    on_dask = FeatureStore(run_features(dataset, FeaturesConfig(workers=1, videos_per_task=1))).videos["vid_b"]
    np.testing.assert_allclose(on_dask, in_process, atol=1e-5)


def test_wrong_arch_and_missing_frames_are_clear_errors(dataset: BaseConfig) -> None:
    wrong = BaseConfig(**{**dataset.__dict__, "clip_arch": "vit-b-32"})
    with pytest.raises(PipelineError, match="base.clip_arch"):
        run_features(wrong, FeaturesConfig(workers=0))
    write_queries(dataset.annotations_path, [Query("q3", "x", "vid_missing", 1.0, (), "test")])
    with pytest.raises(PipelineError, match="neither in the frame cache .* nor in the failure manifest"):
        run_features(dataset, FeaturesConfig(workers=0))
