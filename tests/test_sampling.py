"""Frame index rules: the official ProPy TSN/segment-centre sampling (defects included) and the tail fix."""

from __future__ import annotations

import numpy as np
import pytest

from stages.data.sampling import eval_indices, train_indices


def test_train_faithful_short_video_pads_with_last_frame() -> None:
    got = train_indices(5, 8, np.random.default_rng(0))
    assert got.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_train_faithful_exact_length_uses_every_frame_in_order() -> None:
    assert train_indices(8, 8, np.random.default_rng(0)).tolist() == list(range(8))


def test_train_faithful_long_video_pinned_sequence() -> None:
    # a = 22 // 4 = 5: segment starts 0, 5, 10, 15 plus one randint(5) each (default_rng(0) draws 4, 3, 2, 1);
    # frames 20 and 21 are never used
    assert train_indices(22, 4, np.random.default_rng(0)).tolist() == [4, 8, 12, 16]
    assert train_indices(22, 4, np.random.default_rng(1)).tolist() == [2, 7, 13, 19]


def test_train_faithful_drops_the_tail_and_stays_in_segments() -> None:
    rng = np.random.default_rng(3)
    n, nf = 63, 32  # a = 1: deterministic, the first 32 frames only (the official defect)
    assert train_indices(n, nf, rng).tolist() == list(range(32))
    n = 100
    seen = np.concatenate([train_indices(n, nf, rng) for _ in range(200)])
    segment = n // nf
    assert seen.max() < nf * segment  # frames 96..99 are never sampled
    picks = train_indices(n, nf, rng)
    assert np.all(picks // segment == np.arange(nf))


def test_train_tail_fix_pinned_and_covers_the_whole_video() -> None:
    # default_rng(0).random(4) = 0.637, 0.270, 0.041, 0.017: floor((i + u) * 22 / 4)
    assert train_indices(22, 4, np.random.default_rng(0), tail_fix=True).tolist() == [3, 6, 11, 16]
    assert train_indices(3, 6, np.random.default_rng(0), tail_fix=True).tolist() == [0, 0, 1, 1, 2, 2]
    assert train_indices(6, 6, np.random.default_rng(0), tail_fix=True).tolist() == [0, 1, 2, 3, 4, 5]
    rng = np.random.default_rng(3)
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
    for picks in (train_indices(n, 32, np.random.default_rng(n), tail_fix), eval_indices(n, 32, tail_fix)):
        assert picks.shape == (32,) and picks.dtype == np.int64
        assert picks.min() >= 0 and picks.max() < n
        assert np.all(np.diff(picks) >= 0)


def test_empty_video_is_an_error_not_minus_one() -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        eval_indices(0, 32)
