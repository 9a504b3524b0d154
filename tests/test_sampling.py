"""Frame index rules: the official ProPy TSN/segment-centre sampling (defects included, checked against the official
samplers' tables) and the tail fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.data.sampling import eval_indices, train_indices


def test_train_faithful_short_video_pads_with_last_frame() -> None:
    got = train_indices(5, 8, np.random.RandomState(0))
    assert got.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_train_faithful_exact_length_uses_every_frame_in_order() -> None:
    assert train_indices(8, 8, np.random.RandomState(0)).tolist() == list(range(8))


def test_train_faithful_long_video_pinned_sequence() -> None:
    # a = 22 // 4 = 5: segment starts 0, 5, 10, 15 plus one legacy randint(5, size=4) (RandomState(0): 4, 0, 3, 3);
    # frames 20 and 21 are never used
    assert train_indices(22, 4, np.random.RandomState(0)).tolist() == [4, 5, 13, 18]
    assert train_indices(22, 4, np.random.RandomState(1)).tolist() == [3, 9, 10, 16]


def test_train_faithful_drops_the_tail_and_stays_in_segments() -> None:
    rng = np.random.RandomState(3)
    n, nf = 63, 32  # a = 1: deterministic, the first 32 frames only (the official defect)
    assert train_indices(n, nf, rng).tolist() == list(range(32))
    n = 100
    seen = np.concatenate([train_indices(n, nf, rng) for _ in range(200)])
    segment = n // nf
    assert seen.max() < nf * segment  # frames 96..99 are never sampled
    picks = train_indices(n, nf, rng)
    assert np.all(picks // segment == np.arange(nf))


def test_train_tail_fix_pinned_and_covers_the_whole_video() -> None:
    # RandomState(0).random_sample(4) = 0.549, 0.715, 0.603, 0.545: floor((i + u) * 22 / 4)
    assert train_indices(22, 4, np.random.RandomState(0), tail_fix=True).tolist() == [3, 9, 14, 19]
    assert train_indices(3, 6, np.random.RandomState(0), tail_fix=True).tolist() == [0, 0, 1, 1, 2, 2]
    assert train_indices(6, 6, np.random.RandomState(0), tail_fix=True).tolist() == [0, 1, 2, 3, 4, 5]
    rng = np.random.RandomState(3)
    seen = np.concatenate([train_indices(100, 32, rng, tail_fix=True) for _ in range(200)])
    assert set(seen.tolist()) == set(range(100))


def test_eval_faithful_pinned_sequences() -> None:
    assert eval_indices(5, 8).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert eval_indices(8, 8).tolist() == list(range(8))
    assert eval_indices(22, 4).tolist() == [2, 8, 13, 19]  # int(22/8 + i * 22/4)
    assert eval_indices(100, 32).tolist() == [int(100 / 64 + i * 100 / 32) for i in range(32)]


def test_eval_tail_fix_spreads_short_videos_and_matches_official_for_long_ones() -> None:
    assert eval_indices(5, 8, tail_fix=True).tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    assert eval_indices(8, 8, tail_fix=True).tolist() == list(range(8))
    for n in (33, 50, 100, 228, 1000, 4097):
        assert np.array_equal(eval_indices(n, 32, tail_fix=True), eval_indices(n, 32))


@pytest.mark.parametrize("n", [1, 7, 32, 33, 64, 250])
@pytest.mark.parametrize("tail_fix", [False, True])
def test_indices_are_sorted_and_in_range(n: int, tail_fix: bool) -> None:
    for picks in (train_indices(n, 32, np.random.RandomState(n), tail_fix), eval_indices(n, 32, tail_fix)):
        assert picks.shape == (32,) and picks.dtype == np.int64
        assert picks.min() >= 0 and picks.max() < n
        assert np.all(np.diff(picks) >= 0)


def test_empty_video_is_an_error_not_minus_one() -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        eval_indices(0, 32)


@pytest.fixture(scope="module")
def official_tables(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "propy_official" / "train_cfg32_steps.npz") as npz:
        return {key: npz[key] for key in npz.files if key.startswith("tsn_")}


def test_official_sampler_tables(official_tables: dict[str, np.ndarray]) -> None:
    """Each case: a legacy RandomState seeded with the case's seed, one video (rows past Nf are -9 padding)."""
    t = official_tables
    cases = zip(
        t["tsn_num_frames"], t["tsn_nf"], t["tsn_seed"], t["tsn_train_indices"], t["tsn_eval_indices"], strict=True
    )
    checked = 0
    for n, nf, seed, train, evaluation in cases:
        assert np.all(train[nf:] == -9) and np.all(evaluation[nf:] == -9)
        if n == 0:  # the official samplers give -1 everywhere; ours refuses a video without frames
            assert np.all(train[:nf] == -1) and np.all(evaluation[:nf] == -1)
            with pytest.raises(ValueError, match="at least one frame"):
                train_indices(0, int(nf), np.random.RandomState(int(seed)))
            continue
        ours = train_indices(int(n), int(nf), np.random.RandomState(int(seed)))
        assert ours.tolist() == train[:nf].tolist(), (n, nf, seed)
        assert eval_indices(int(n), int(nf)).tolist() == evaluation[:nf].tolist(), (n, nf)
        checked += 1
    assert checked == 48


def test_official_sampler_stream_of_six_videos(official_tables: dict[str, np.ndarray]) -> None:
    """Six videos drawn one after another from one stream seeded once (a = 1 and a = 0 consume no numbers)."""
    t = official_tables
    rng = np.random.RandomState(int(t["tsn_stream_seed"]))
    ours = [train_indices(int(n), int(t["tsn_stream_nf"]), rng).tolist() for n in t["tsn_stream_num_frames"]]
    assert ours == t["tsn_stream_indices"].tolist()


def test_the_new_generator_api_would_give_other_indices(official_tables: dict[str, np.ndarray]) -> None:
    t = official_tables
    row = int(np.flatnonzero((t["tsn_num_frames"] == 228) & (t["tsn_nf"] == 32))[0])
    a = 228 // 32
    other = np.arange(32) * a + np.random.default_rng(int(t["tsn_seed"][row])).integers(0, a, size=32)
    assert other.tolist() != t["tsn_train_indices"][row].tolist()
