"""The prompt pyramid reproduces the official structure and masks exactly, and refuses invalid configs clearly."""

from __future__ import annotations

import numpy as np
import pytest

from stages.data.errors import PipelineError
from stages.models.pyramid import Pyramid, PyramidConfig

OFFSET_FORM = PyramidConfig(num_frames=32, offset=(0, 1, 1, 1, 1))


@pytest.mark.parametrize("config", [PyramidConfig(), OFFSET_FORM], ids=["H", "offset"])
def test_every_official_array_matches(fixtures_dir, config) -> None:
    expected = np.load(fixtures_dir / "propy_official" / "masks_cfg32.npz")
    ours = Pyramid(config).official_arrays(num_visual_prompts=4, tokens_per_frame=50)
    assert set(ours) == set(expected.files)
    for key in expected.files:
        assert ours[key].dtype == expected[key].dtype, key
        assert ours[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)


def test_offset_form_derives_the_paper_default() -> None:
    assert OFFSET_FORM.adjacent_pairs() == PyramidConfig().kernel_stride
    assert PyramidConfig(num_frames=16, offset=(1, 1, 1, 1)).adjacent_pairs() == ((2, 1), (3, 2), (3, 2), (3, 1))
    assert PyramidConfig(num_frames=8, offset=(0, 0, 0)).adjacent_pairs() == ((2, 2), (2, 2), (2, 1))


@pytest.mark.parametrize(
    ("num_frames", "pairs", "counts"),
    [  # paper Table 4
        (16, ((4, 2), (3, 2), (3, 1)), (16, 7, 3, 1)),
        (16, ((2, 1), (3, 2), (3, 2), (3, 1)), (16, 15, 7, 3, 1)),
        (32, ((4, 2), (3, 2), (3, 2), (3, 1)), (32, 15, 7, 3, 1)),
        (32, ((2, 2), (2, 1), (3, 2), (3, 2), (3, 1)), (32, 16, 15, 7, 3, 1)),
    ],
)
def test_table4_pyramids_and_closed_forms(num_frames, pairs, counts) -> None:
    pyramid = Pyramid(PyramidConfig(num_frames=num_frames, kernel_stride=pairs))
    assert pyramid.counts == counts and pyramid.num_events == sum(counts[1:])
    start, end = pyramid.spans.T
    # events see each other iff one span contains the other; an event sees exactly the frames of its span
    contains = (start[:, None] <= start[None, :]) & (end[None, :] <= end[:, None])
    np.testing.assert_array_equal(pyramid.event_event_allowed, contains | contains.T)
    frames = np.arange(num_frames)
    np.testing.assert_array_equal(pyramid.event_frame_allowed, (start[:, None] <= frames) & (frames < end[:, None]))
    np.testing.assert_array_equal(pyramid.unit_allowed, pyramid.unit_allowed.T)
    assert tuple(pyramid.spans[0]) == (0, num_frames)  # the top event is the whole video
    np.testing.assert_allclose(pyramid.proposals, pyramid.spans / num_frames)
    # the top layer sees everything, the bottom layer its own window only
    assert pyramid.event_frame_allowed[0].all()
    assert (pyramid.event_frame_allowed[pyramid.level_of_event == 1].sum(1) == pairs[0][0]).all()


def test_interaction_areas_follow_their_definitions() -> None:
    pyramid = Pyramid(PyramidConfig(num_frames=8, kernel_stride=((2, 2), (2, 1), (3, 1))))  # 4 + 3 + 1 events
    level = pyramid.level_of_event
    areas = {name: pyramid.event_interaction(name) for name in ("AD", "A", "D", "P", "C", "PC", "W", "S")}
    eye = np.eye(pyramid.num_events, dtype=bool)
    np.testing.assert_array_equal(areas["S"], eye)
    assert areas["W"].all()
    np.testing.assert_array_equal(areas["A"] | areas["D"], areas["AD"])
    np.testing.assert_array_equal(areas["P"] | areas["C"], areas["PC"])
    np.testing.assert_array_equal(areas["A"], areas["D"].T)
    np.testing.assert_array_equal(areas["P"], areas["C"].T)
    ancestors, parents = areas["A"] & ~eye, areas["P"] & ~eye
    assert (level[np.nonzero(ancestors)[1]] > level[np.nonzero(ancestors)[0]]).all()
    assert (level[np.nonzero(parents)[1]] == level[np.nonzero(parents)[0]] + 1).all()
    bottom = np.flatnonzero(level == 1)[0]  # frames [0, 2): ancestors are the top and the first middle event
    assert ancestors[bottom].sum() == 2 and parents[bottom].sum() == 1
    with pytest.raises(PipelineError, match="must be one of"):
        pyramid.event_interaction("X")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (PyramidConfig(num_frames=32, kernel_stride=((3, 2),)), "does not tile"),
        (PyramidConfig(num_frames=8, kernel_stride=((2, 2), (5, 1))), "layer 2"),
        (PyramidConfig(num_frames=8, kernel_stride=()), "at least one layer"),
        (PyramidConfig(num_frames=24, offset=(0, 1, 1, 1)), "power of two"),
        (PyramidConfig(num_frames=16, offset=(0, 1, 1)), "needs 4 entries"),
        (PyramidConfig(num_frames=16, offset=(0, 1, 2, 1)), "0 or 1"),
    ],
)
def test_invalid_configs_are_refused(config, message) -> None:
    with pytest.raises(PipelineError, match=message):
        Pyramid(config)


def test_official_json_forms() -> None:
    assert PyramidConfig.from_official({"Nf": 32, "offset": [0, 1, 1, 1, 1]}) == OFFSET_FORM
    assert PyramidConfig.from_official({"Nf": 32, "H": [[2, 2], [2, 1], [3, 2], [3, 2], [3, 1]]}) == PyramidConfig()
    with pytest.raises(PipelineError, match="expected"):
        PyramidConfig.from_official({"H": [[2, 2]]})
