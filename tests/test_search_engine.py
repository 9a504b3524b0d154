"""The search engine: exact fp16 scan + fp32 re-scoring equals a plain fp32 ranking; filters; the approximate index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.search.ann import AnnConfig, AnnIndex, build_ann
from stages.search.engine import EngineConfig, SearchEngine
from stages.search.store import StoreWriter, UnitStore, VideoRecord

DIM = 32


def write_store(directory: Path, units: list[np.ndarray], packed: list[np.ndarray] | None = None) -> UnitStore:
    """A store of the given per-video units (fp32, stored as fp16)."""
    shape = None if packed is None else packed[0].shape
    writer = StoreWriter(directory, sum(len(u) for u in units), len(units), units[0].shape[1], shape)
    for index, video_units in enumerate(units):
        record = VideoRecord(f"v{index}", f"v{index}.mp4", f"v{index}", {}, 10.0, 30, len(video_units))
        windows = np.stack([np.arange(len(video_units)), np.arange(len(video_units)) + 1], 1).astype(np.float32)
        writer.add(
            [record],
            video_units.astype(np.float16),
            windows,
            np.arange(len(video_units), dtype=np.int32),
            None if packed is None else packed[index][None].astype(np.float16),
        )
    writer.finish()
    writer.publish()
    return UnitStore.open(directory)


def random_units(count: int, rng: np.random.Generator, low: int = 3, high: int = 9) -> list[np.ndarray]:
    units = [rng.standard_normal((int(rng.integers(low, high)), DIM)).astype(np.float32) for _ in range(count)]
    return [u / np.linalg.norm(u, axis=1, keepdims=True) for u in units]


def fp32_scores(units: list[np.ndarray], queries: torch.Tensor) -> np.ndarray:
    """[Q, V] max over each video's (fp16-stored) units of the cosine, in fp32: the reference ranking."""
    q = F.normalize(queries, dim=-1).numpy()
    return np.stack([(u.astype(np.float16).astype(np.float32) @ q.T).max(axis=0) for u in units], axis=1)


def stable_order(row: np.ndarray) -> list[int]:
    return np.lexsort((np.arange(len(row)), -row)).tolist()


@pytest.mark.parametrize("num_queries", [1, 5, 40])  # 40 > half_queries: the fp32 path
def test_exact_scan_ranks_as_fp32_with_the_stable_tie_rule(tmp_path: Path, num_queries: int) -> None:
    rng = np.random.default_rng(0)
    units = random_units(300, rng)
    units[7] = units[3].copy()  # an exact tie: the earlier video must come first, as in evaluation
    store = write_store(tmp_path / "store", units)
    queries = torch.from_numpy(units[3][:1]).repeat(num_queries, 1) + 0.1 * torch.randn(num_queries, DIM)
    reference = fp32_scores(units, queries)
    engine = SearchEngine(store, None, EngineConfig(chunk_units=97, half_queries=16))
    results = engine.search(queries, k=25)
    for row, query, matches in zip(reference, F.normalize(queries, dim=-1), results, strict=True):
        assert [m.video for m in matches] == stable_order(row)[:25]
        assert np.allclose([m.score for m in matches], row[[m.video for m in matches]], atol=1e-6)
        for m in matches:  # the moment is the video's best unit
            lo, hi = store.offsets[m.video], store.offsets[m.video + 1]
            assert m.unit == lo + int(np.argmax(store.units[lo:hi].astype(np.float32) @ query.numpy()))
    order = [m.video for m in results[0]]
    assert order.index(3) + 1 == order.index(7)  # tied twins: the earlier video first


def test_filters_min_score_and_a_subset_of_videos(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    units = random_units(60, rng)
    store = write_store(tmp_path / "store", units)
    queries = torch.randn(3, DIM)
    reference = fp32_scores(units, queries)
    engine = SearchEngine(store, None, EngineConfig(chunk_units=50))
    subset = np.array([2, 5, 11, 40, 59])
    for row, matches in zip(reference, engine.search(queries, k=3, videos=subset), strict=True):
        assert [m.video for m in matches] == subset[stable_order(row[subset])[:3]].tolist()
    threshold = float(np.median(reference[0]))
    matches = engine.search(queries[:1], k=60, min_score=threshold)[0]
    assert [m.video for m in matches] == [v for v in stable_order(reference[0]) if reference[0, v] >= threshold]


def test_models_with_their_own_score_are_ranked_by_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    units = random_units(40, rng, low=4, high=5)
    packed = [np.concatenate([u, u[:1] * 0.5]) for u in units]  # [K=5, D]: a fixed-shape per-video tensor

    def score_fn(queries: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:  # depends on the raw query norm
        return torch.einsum("qd,vd->qv", queries, videos[:, -1]) + 0.1 * videos[:, 0, 0]

    store = write_store(tmp_path / "store", units, packed)
    queries = torch.randn(2, DIM) * 3
    expected = score_fn(queries, torch.from_numpy(np.stack(packed)).half().float()).numpy()
    results = SearchEngine(store, score_fn, EngineConfig()).search(queries, k=7)
    for row, query, matches in zip(expected, queries, results, strict=True):
        assert [m.video for m in matches] == stable_order(row)[:7]
        assert np.allclose([m.score for m in matches], row[[m.video for m in matches]], atol=1e-5)
        for m in matches:  # the moment: the unit most similar to the query
            lo, hi = store.offsets[m.video], store.offsets[m.video + 1]
            cosines = store.units[lo:hi].astype(np.float32) @ F.normalize(query, dim=-1).numpy()
            assert m.unit == lo + int(np.argmax(cosines))


def test_approximate_index_finds_the_exact_top_videos_and_scores_them_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((20, DIM)).astype(np.float32)
    units = []
    for _ in range(2000):  # clustered videos, as real embeddings are
        u = centres[rng.integers(20)] + 0.7 * rng.standard_normal((int(rng.integers(4, 12)), DIM)).astype(np.float32)
        units.append(u / np.linalg.norm(u, axis=1, keepdims=True))
    store = write_store(tmp_path / "store", units)
    config = AnnConfig(
        min_units=1000, max_lists=32, subquantizers=16, probes=8, candidate_units=400, candidate_videos=60
    )
    build_ann(store.units, config, tmp_path / "store" / "ann.faiss")
    approximate = SearchEngine(store, None, EngineConfig(), AnnIndex(tmp_path / "store" / "ann.faiss", config))
    exact = SearchEngine(store, None, EngineConfig())
    picks = rng.integers(0, store.num_units, 50)
    queries = torch.from_numpy(store.units[picks].astype(np.float32)) + 0.1 * torch.randn(50, DIM)
    reference = fp32_scores(units, queries)
    found = approximate.search(queries, k=10)
    truth = exact.search(queries, k=10)
    recall = np.mean([len({m.video for m in a} & {m.video for m in e}) / 10 for a, e in zip(found, truth, strict=True)])
    assert recall >= 0.9
    for row, matches in zip(reference, found, strict=True):  # candidates are re-scored exactly
        assert np.allclose([m.score for m in matches], row[[m.video for m in matches]], atol=1e-6)
        assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    assert exact.search(queries[:2], k=10) == approximate.search(queries[:2], k=10, exact=True)
    few = approximate.search(queries[:1], k=10, videos=np.arange(30))[0]  # a small subset: searched exactly
    assert [m.video for m in few] == stable_order(reference[0][:30])[:10]
