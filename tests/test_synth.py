"""The synthetic dataset: real mp4 files, TVR-format captions that match the rendered events, determinism."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from stages.data.config import BaseConfig, config_from_dict
from stages.data.errors import PipelineError
from stages.synthetic.scenes import ObjectState, describe_still
from stages.synthetic.synth import SPLITS, SynthConfig, plan_dataset, run_synth

TINY = SynthConfig(
    train_videos=3,
    val_videos=1,
    test_videos=2,
    width=48,
    height=32,
    min_duration=4.0,
    max_duration=6.0,
    min_event=1.0,
    max_event=2.0,
    workers=1,
)


def _lines(root: Path, split: str) -> list[dict]:
    path = Path(root) / "annotations" / f"synthetic_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, dict[str, int]]:
    cfg = replace(TINY, root=str(tmp_path_factory.mktemp("synth")))
    return cfg, run_synth(BaseConfig(seed=7), cfg)


def test_videos_decode_to_the_planned_frames(generated: tuple[SynthConfig, dict[str, int]]) -> None:
    cfg, counts = generated
    plans = plan_dataset(7, cfg)
    assert counts["written"] == counts["videos"] == len(plans) == 6
    for plan in plans:
        with av.open(str(cfg.videos_dir / f"{plan.video_id}.mp4")) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
            assert float(stream.duration * stream.time_base) == pytest.approx(plan.duration, abs=1 / cfg.fps)
        assert decoded.shape == (plan.n_frames, cfg.height, cfg.width, 3)
        assert cfg.min_duration <= plan.duration <= cfg.max_duration
        # The pixels are the rendered scene up to H.264 / yuv420p loss.
        error = np.abs(decoded.astype(np.int16) - plan.frames().astype(np.int16)).mean()
        assert error < 6.0, f"{plan.video_id}: mean absolute error {error:.1f}"


def test_annotations_are_tvr_lines_that_match_the_events(generated: tuple[SynthConfig, dict[str, int]]) -> None:
    cfg, counts = generated
    plans = {p.video_id: p for p in plan_dataset(7, cfg)}
    videos_per_split, desc_ids = defaultdict(set), []
    for split in SPLITS:
        for line in _lines(cfg.root, split):
            assert set(line) == {"desc_id", "desc", "vid_name", "duration", "ts"}
            plan = plans[line["vid_name"]]
            assert plan.split == split
            start, end = line["ts"]
            assert 0 <= start < end <= line["duration"] == pytest.approx(plan.duration, abs=1e-4)
            caption = next(c for c in plan.captions if c.text == line["desc"])
            assert (start, end) == pytest.approx(plan.moment(caption), abs=1e-4)
            assert end - start >= cfg.min_event - 1e-6
            videos_per_split[split].add(line["vid_name"])
            desc_ids.append(line["desc_id"])
    assert len(desc_ids) == len(set(desc_ids)) == counts["queries"]
    assert all(videos_per_split[s] for s in SPLITS)
    assert not videos_per_split["train"] & videos_per_split["val"]
    assert not videos_per_split["train"] & videos_per_split["test"]
    assert not videos_per_split["val"] & videos_per_split["test"]
    assert set().union(*videos_per_split.values()) == {p.stem for p in cfg.videos_dir.glob("*.mp4")}


def test_same_seed_same_bytes_other_seed_differs(generated: tuple[SynthConfig, dict[str, int]], tmp_path: Path) -> None:
    cfg, _ = generated
    again = replace(cfg, root=str(tmp_path / "again"), train_videos=1, val_videos=1, test_videos=1, workers=2)
    run_synth(BaseConfig(seed=7), again)
    for video in again.videos_dir.glob("*.mp4"):
        assert video.read_bytes() == (cfg.videos_dir / video.name).read_bytes()
    assert _lines(again.root, "val") == _lines(cfg.root, "val")
    other = replace(again, root=str(tmp_path / "other"))
    run_synth(BaseConfig(seed=8), other)
    assert _lines(other.root, "val") != _lines(cfg.root, "val")
    video = "synth_val_0000.mp4"
    assert (other.videos_dir / video).read_bytes() != (cfg.videos_dir / video).read_bytes()


def test_rerun_regenerates_only_missing_or_changed_videos(tmp_path: Path) -> None:
    cfg = replace(TINY, root=str(tmp_path), train_videos=2, val_videos=1, test_videos=1)
    run_synth(BaseConfig(), cfg)
    (cfg.videos_dir / "synth_train_0001.mp4").unlink()
    (cfg.videos_dir / "synth_val_0000.mp4").write_bytes(b"corrupt")
    (cfg.videos_dir / "synth_test_0000.mp4.part").write_bytes(b"interrupted")
    (cfg.videos_dir / "synth_test_0007.mp4").write_bytes(b"stale")
    counts = run_synth(BaseConfig(), cfg)
    assert (counts["written"], counts["skipped"], counts["removed"]) == (2, 2, 1)
    assert sorted(p.name for p in cfg.videos_dir.iterdir()) == [
        "synth_test_0000.mp4",
        "synth_train_0000.mp4",
        "synth_train_0001.mp4",
        "synth_val_0000.mp4",
    ]
    assert run_synth(BaseConfig(), replace(cfg, crf=30))["written"] == 4  # an encoding change redoes everything


def test_default_dataset_is_large_varied_and_ambiguous_by_appearance() -> None:
    cfg = SynthConfig()
    test = [p for p in plan_dataset(42, cfg) if p.split == "test"]
    captions = [(p, c) for p in test for c in p.captions]
    assert len(test) >= 100 and len(captions) >= 300
    assert len({len(p.events) for p in test}) >= 4
    lengths = [e.end - e.start for p in test for e in p.events]
    assert min(lengths) >= cfg.min_event - 1e-6 and max(lengths) > 2 * min(lengths)
    assert {e.action for p in test for e in p.events} >= {"move", "grow", "shrink", "recolour", "blink", "spin"}
    assert {c.last - c.first for _, c in captions} == {0, 1, 2}
    # Appearance alone does not identify the video: most captions' first actor also acts in another test video.
    actors_of = defaultdict(set)
    for plan in test:
        for event in plan.events:
            actors_of[(event.before.colour, event.before.shape)].add(plan.video_id)
    first_actor = [(p.events[c.first].before.colour, p.events[c.first].before.shape, p.video_id) for p, c in captions]
    shared = sum(len(actors_of[(colour, shape)] - {vid}) > 0 for colour, shape, vid in first_actor)
    assert shared / len(captions) > 0.8


def test_captions_describe_what_the_events_do() -> None:
    for plan in plan_dataset(3, replace(SynthConfig(), train_videos=40, val_videos=0, test_videos=0)):
        for caption in plan.captions:
            first = plan.events[caption.first]
            assert caption.text.startswith("a ")
            assert f"{first.before.colour} {first.before.shape}" in caption.text
        for event in plan.events:
            dx, dy = event.after.x - event.before.x, event.after.y - event.before.y
            if event.action == "move":
                expected = {"left": dx < 0, "right": dx > 0, "up": dy < 0, "down": dy > 0}
                assert expected[event.detail] and min(abs(dx), abs(dy)) == 0
            elif event.action in ("grow", "shrink"):
                assert (event.after.size > event.before.size) == (event.action == "grow")
            middle = event.sprite_at((event.start + event.end) / 2)
            assert 0 <= middle.opacity <= 1 and middle.size > 0
            assert event.after.x - event.after.size >= -0.01 and event.after.x + event.after.size <= 1.01


def test_still_description() -> None:
    states = [
        ObjectState("square", "red", 0.2, 0.2, 0.2),
        ObjectState("circle", "blue", 0.5, 0.5, 0.12),
        ObjectState("cross", "green", 0.5, 0.9, 0.08),
        ObjectState("ring", "white", 0.9, 0.5, 0.12, visible=False),
    ]
    assert describe_still(states) == (
        "a large red square at the top left, a blue circle in the center and a small green cross at the bottom"
    )


def test_bad_config_is_a_pipeline_error() -> None:
    with pytest.raises(PipelineError, match="even"):
        config_from_dict(SynthConfig, {"width": 111}, "params.yaml:synth")
    with pytest.raises(PipelineError, match="do not fit"):
        config_from_dict(SynthConfig, {"min_duration": 2.0}, "params.yaml:synth")
