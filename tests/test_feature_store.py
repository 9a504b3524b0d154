"""The HDF5 feature store: layout, attributes, atomic resumable writes, lazy picklable reads."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStore, FeatureStoreInfo, FeatureStoreWriter

INFO = FeatureStoreInfo(
    model="ViT-B-32 (OpenAI)",
    weights_sha256="ab" * 32,
    open_clip_version="3.3.0",
    layer="last: ln_post + proj / ln_final + text_projection",
    normalisation="none",
    arch="vit_b32",
)


def _features(seed: int, rows: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def _read_in_child(store: FeatureStore, queue: multiprocessing.Queue) -> None:
    queue.put(store.videos["v1"].sum())


def test_round_trip_layout_and_attributes(tmp_path: Path) -> None:
    path = tmp_path / "clip_vit_b32.h5"
    with FeatureStoreWriter(path, INFO) as writer:
        writer.write("video", "v1", _features(0, 5))
        writer.write("text", "v1#enc#0", _features(1, 7))
    with h5py.File(path, "r") as handle:
        assert set(handle) == {"video", "text"}  # no temporary group left behind
        assert handle["video/v1"].shape == (5, 8) and handle["text/v1#enc#0"].shape == (7, 8)
        assert handle.attrs["weights_sha256"] == INFO.weights_sha256
    store = FeatureStore(path)
    assert store.info == INFO
    np.testing.assert_array_equal(store.videos["v1"], _features(0, 5))
    np.testing.assert_array_equal(store.texts["v1#enc#0"], _features(1, 7))  # not padded
    assert list(store.videos) == ["v1"] and len(store.texts) == 1 and "v1" in store.videos and "v2" not in store.videos
    assert store.texts.shape("v1#enc#0") == (7, 8)
    with pytest.raises(KeyError):
        store.videos["missing"]


def test_float16_storage_reads_back_float32(tmp_path: Path) -> None:
    with FeatureStoreWriter(tmp_path / "f.h5", INFO, dtype="float16") as writer:
        writer.write("video", "v", _features(0, 3))
    out = FeatureStore(tmp_path / "f.h5").videos["v"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _features(0, 3), atol=1e-2)


def test_resume_keeps_complete_entries_and_drops_partial_ones(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with FeatureStoreWriter(path, INFO) as writer:
        writer.write("video", "done", _features(0, 4))
    with h5py.File(path, "a") as handle:  # what an interrupted run leaves behind
        handle.create_dataset("_partial/video/half", data=_features(1, 2))
    with FeatureStoreWriter(path, INFO) as writer:
        assert writer.has("video", "done")
        assert not writer.has("video", "half")
        writer.write("video", "half", _features(2, 6))
    store = FeatureStore(path)
    assert sorted(store.videos) == ["done", "half"]
    np.testing.assert_array_equal(store.videos["done"], _features(0, 4))
    assert store.videos["half"].shape == (6, 8)
    with h5py.File(path, "r") as handle:
        assert "_partial" not in handle


def test_refuses_another_setup_and_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with FeatureStoreWriter(path, INFO) as writer:
        with pytest.raises(PipelineError, match="non-empty"):
            writer.write("video", "v", np.zeros((0, 8), np.float32))
        with pytest.raises(PipelineError, match="finite"):
            writer.write("video", "v", np.full((2, 8), np.nan, np.float32))
        with pytest.raises(PipelineError, match="no '/'"):
            writer.write("video", "a/b", _features(0, 2))
    other = FeatureStoreInfo(**{**INFO.attrs(), "weights_sha256": "cd" * 32})
    with pytest.raises(PipelineError, match="another setup"):
        FeatureStoreWriter(path, other)
    with pytest.raises(PipelineError, match="does not exist"):
        FeatureStore(tmp_path / "missing.h5")


def test_reader_is_lazy_picklable_and_fork_safe(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with FeatureStoreWriter(path, INFO) as writer:
        writer.write("video", "v1", _features(3, 4))
    store = FeatureStore(path)
    expected = store.videos["v1"].sum()  # the parent holds an open handle now
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.videos["v1"], store.videos["v1"])
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(store, queue))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(expected)
