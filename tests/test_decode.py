"""The `decode` stage: real videos through dask into the frame cache, re-runs, faults, and a kill in the middle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from stages.data.available import failures_path
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.frame_cache import FrameCache, ensure_cache
from stages.data.prepare import PrepareConfig, run_prepare
from stages.data.schema import read_queries
from stages.data.video_io import RateSampler, decode_video, select_frames, tick_range, uniform_cap, write_video
from stages.extract.decode import DecodeConfig, DecodeJob, decode_task, run_decode
from tests.videos import make_video, moving_frames, write_annotations

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """One local dask cluster (processes) shared by the tests: they reach it as an existing scheduler address."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def _setup(tmp_path: Path, videos: dict[str, float], scheduler: str | None = None) -> tuple[BaseConfig, DecodeConfig]:
    """Videos of the given lengths (seconds, 10 fps, 96x64) plus annotations naming them."""
    for i, (vid, seconds) in enumerate(videos.items()):
        make_video(tmp_path / "videos" / f"{vid}.mp4", seconds, seed=i)
    base = BaseConfig(dataset="t", cache_dir=str(tmp_path / "cache"))
    write_annotations(base.annotations_path, list(videos))
    config = DecodeConfig(video_dir=str(tmp_path / "videos"), size=32, workers=1, timeout_s=60)
    return base, replace(config, scheduler_address=scheduler)


def _mtimes(base: BaseConfig) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in base.frames_path.glob("*/zarr.json")}


def test_rate_sampler_keeps_first_frame_at_or_after_each_tick() -> None:
    assert select_frames(np.arange(30) / 10, 3)[0].tolist() == [0, 4, 7, 10, 14, 17, 20, 24, 27]
    assert select_frames(np.arange(9) / 3, 3)[0].tolist() == list(range(9))  # a 3 fps source keeps every frame
    indices, ticks = select_frames(np.arange(10) / 2, 3)  # slower sources are never duplicated: ticks are skipped
    assert indices.tolist() == list(range(10)) and ticks.tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13]
    sampler = RateSampler(3)
    assert [sampler.keep(t) for t in (5.0, 5.1, 5.34, 5.4)] == [True, False, True, False]  # relative to the start
    late = RateSampler(3, offset=2.5)  # a clip from 2.5 s on the timeline meets its ticks 8 (2.67 s), 9 (3 s), ...
    assert [late.tick(t) for t in (0.0, 0.4, 0.5, 0.6, 0.84)] == [None, 8, 9, None, 10]
    assert tick_range(2.5, 2.25, 3) == (8, 15) and tick_range(0.0, 2.0, 3) == (0, 6)
    assert uniform_cap(10, 4).tolist() == [0, 3, 6, 9] and uniform_cap(3, 4).tolist() == [0, 1, 2]


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_portrait_and_landscape_are_cropped_not_squashed(tmp_path: Path, decoder: str) -> None:
    frames = np.zeros((4, 96, 64, 3), np.uint8)  # portrait 64x96: a white square of 32x32 in the centre
    frames[:, 32:64, 16:48] = 255
    decoded = decode_video(write_video(tmp_path / "p.mp4", frames, fps=3, crf=10), fps=3, size=32, decoder=decoder)
    assert decoded.frames.shape == (4, 32, 32, 3) and decoded.source_size == (64, 96)
    mask = decoded.frames[0, :, :, 1] > 128  # after scaling to 32x48 and cropping 32x32: square 16x16 in the centre
    assert mask[10:22, 10:22].all() and not mask[:6].any() and not mask[-6:].any() and not mask[:, :6].any()


def test_decode_rerun_and_adding_a_video(tmp_path: Path, scheduler: str) -> None:
    base, config = _setup(tmp_path, {"a": 2.0, "b": 3.0}, scheduler)
    summary = run_decode(base, config)
    assert sorted(summary.decoded) == ["a", "b"] and not summary.failures
    cache = FrameCache(base.frames_path)
    assert cache.video_ids() == ["a", "b"] and [cache.num_frames(v) for v in "ab"] == [6, 9]
    attrs = cache.attrs("b")
    assert attrs["fps"] == 3.0 and attrs["frame_count"] == 9 and attrs["source"]["frames"] == 30
    assert len(attrs["source"]["sha256"]) == 64 and attrs["decoder"].startswith("pyav")
    assert attrs["codec"] == {"name": "zstd", "level": 3} and attrs["resize"].startswith("short side to 32")
    reference = decode_video(tmp_path / "videos" / "b.mp4", 3, 32).frames
    np.testing.assert_array_equal(cache.read("b"), reference)
    assert failures_path(base).read_text() == ""

    before = _mtimes(base)
    again = run_decode(base, config)  # nothing to do: no cluster, nothing rewritten
    assert again.decoded == [] and sorted(again.skipped) == ["a", "b"] and _mtimes(base) == before

    os.utime(tmp_path / "videos" / "a.mp4", ns=(1, 1))  # a copy or checkout changes the mtime, not the content
    assert run_decode(base, config).decoded == [] and _mtimes(base) == before

    make_video(tmp_path / "videos" / "c.mp4", 1.0, seed=9)
    write_annotations(base.annotations_path, ["a", "b", "c"])
    added = run_decode(base, config)
    assert added.decoded == ["c"] and _mtimes(base).items() >= before.items()

    capped = run_decode(base, replace(config, max_frames=4, codec="jpeg"))  # other settings: everything again
    assert sorted(capped.decoded) == ["a", "b", "c"]
    cache = FrameCache(base.frames_path)  # a reader caches metadata: open a new one after the cache changed
    assert [cache.num_frames(v) for v in "abc"] == [4, 4, 3]
    assert cache.attrs("b")["codec"] == {"name": "jpeg", "quality": 90}
    assert np.abs(cache.read("b", [0, 3]).astype(int) - reference[[0, 8]]).mean() < 6


def test_faulty_videos_go_to_the_manifest_and_never_into_the_cache(tmp_path: Path, scheduler: str) -> None:
    base, config = _setup(tmp_path, {"good": 2.0, "source": 6.0}, scheduler)
    videos = tmp_path / "videos"
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    (videos / "empty.mp4").write_bytes(b"")
    whole = (videos / "source.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    fast_start = tmp_path / "fs.mp4"  # index first, so a cut file still opens and decodes part of the frames
    with av.open(str(fast_start), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in moving_frames(60, 96, 64):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    data = fast_start.read_bytes()
    (videos / "cut.mp4").write_bytes(data[: len(data) // 2])
    (videos / "locked.mp4").write_bytes(whole)
    (videos / "locked.mp4").chmod(0)
    bad = ["corrupt", "cut", "empty", "truncated"] + ([] if os.geteuid() == 0 else ["locked"])
    write_annotations(base.annotations_path, ["good", "source", *bad])

    with pytest.raises(PipelineError, match=rf"{len(bad)} video\(s\) could not be decoded.*decode_failures.jsonl"):
        run_decode(base, config)
    assert FrameCache(base.frames_path).video_ids() == ["good", "source"]  # the rest was still finished
    records = [json.loads(line) for line in failures_path(base).read_text().splitlines()]
    assert [r["video_id"] for r in records] == sorted(bad)
    reasons = {r["video_id"]: r["reason"] for r in records}
    assert "empty file" in reasons["empty"] and "truncated" in reasons["cut"]
    assert all(r["path"].endswith(f"{r['video_id']}.mp4") for r in records)
    assert not any((base.frames_path.parent / "frames.zarr.partial").glob("*"))

    tolerant = run_decode(base, replace(config, max_failures=len(bad)))
    assert tolerant.decoded == [] and len(tolerant.failures) == len(bad)


def test_a_missing_file_is_a_failure_like_a_corrupt_one(tmp_path: Path, scheduler: str) -> None:
    base, config = _setup(tmp_path, {"here": 1.0}, scheduler)
    write_annotations(base.annotations_path, ["here", "gone"])
    with pytest.raises(PipelineError, match=r"1 video\(s\) could not be decoded.*gone: file not found.*video_dir"):
        run_decode(base, config)
    assert FrameCache(base.frames_path).video_ids() == ["here"]  # the others were still decoded
    [record] = [json.loads(line) for line in failures_path(base).read_text().splitlines()]
    assert record["video_id"] == "gone" and record["path"].endswith("gone.mp4") and "not found" in record["reason"]
    summary = run_decode(base, replace(config, max_failures=1))
    assert summary.skipped == ["here"] and [f.video_id for f in summary.failures] == ["gone"]

    (tmp_path / "videos" / "here.mp4").unlink()  # decoded once, then the file was deleted: the frames are kept
    summary = run_decode(base, replace(config, max_failures=1))
    assert summary.source_gone == ["here"] and [f.video_id for f in summary.failures] == ["gone"]
    assert FrameCache(base.frames_path).video_ids() == ["here"]
    with pytest.raises(PipelineError, match="2 video"):  # other settings: the cached frames cannot stand in
        run_decode(base, replace(config, max_failures=1, size=16))


def test_a_video_dir_that_does_not_exist_is_named(tmp_path: Path) -> None:
    base, config = _setup(tmp_path, {"a": 1.0})
    with pytest.raises(PipelineError, match=r"decode.video_dir '.*nowhere' does not exist"):
        run_decode(base, replace(config, video_dir=str(tmp_path / "nowhere")))


def test_timeout_kills_the_decoder_and_leaves_nothing(tmp_path: Path) -> None:
    base, config = _setup(tmp_path, {"slow": 8.0})
    ensure_cache(base.frames_path)
    job = DecodeJob(
        "slow", str(tmp_path / "videos" / "slow.mp4"), str(base.frames_path), replace(config, timeout_s=0.01)
    )
    outcome = decode_task(job)
    assert outcome.reason is not None and outcome.reason.startswith("timeout")
    assert FrameCache(base.frames_path).video_ids() == []
    done = decode_task(DecodeJob("slow", job.source, job.cache_path, config))
    assert done.reason is None and done.frames == 24 and FrameCache(base.frames_path).num_frames("slow") == 24


def test_killed_run_resumes_without_redoing_or_corrupting(tmp_path: Path, scheduler: str) -> None:
    videos = {f"v{i}": 4.0 for i in range(10)}
    base, config = _setup(tmp_path, videos)
    params = tmp_path / "params.yaml"
    params.write_text(
        f"base: {{dataset: t, cache_dir: {base.cache_dir}}}\n"
        f"decode: {{video_dir: {config.video_dir}, size: 96, workers: 1, max_failures: 0}}\n"
    )
    command = [sys.executable, str(REPO / "pipeline.py"), "--params", str(params), "decode"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    cache = FrameCache(base.frames_path)
    deadline = time.monotonic() + 60
    while len(cache.video_ids()) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the stage, its dask scheduler and workers, and any decoder child
    process.wait()
    survivors = _mtimes(base)
    assert 3 <= len(survivors) < len(videos), "the kill should land in the middle of the run"
    for vid in survivors:  # whatever is visible is complete
        assert cache.read(vid).shape == (12, 96, 96, 3)

    rerun = run_decode(base, replace(config, size=96, scheduler_address=scheduler))
    assert sorted(rerun.skipped) == sorted(survivors) and len(rerun.decoded) == len(videos) - len(survivors)
    assert FrameCache(base.frames_path).video_ids() == sorted(videos)
    assert _mtimes(base).items() >= survivors.items()  # complete videos were not redone
    reference = decode_video(tmp_path / "videos" / "v7.mp4", 3, 96).frames
    np.testing.assert_array_equal(FrameCache(base.frames_path).read("v7"), reference)


CLIPS = {"srcA_0.0_2.5": 2.5, "srcA_10.0_12.25": 2.25, "srcA_20.0_21.75": 1.75}  # seconds, at 12 fps


def _clip_frames(index: int, seconds: float) -> np.ndarray:
    """Flat frames whose red says the clip and whose green says the frame's index within it (8 per frame)."""
    frames = np.empty((round(seconds * 12), 64, 96, 3), np.uint8)
    frames[..., 0] = 60 + 60 * index
    frames[..., 1] = (8 * np.arange(len(frames), dtype=np.uint8))[:, None, None]
    frames[..., 2] = 128
    return frames


def test_merged_clips_decode_onto_one_timeline(tmp_path: Path, scheduler: str) -> None:
    for index, (clip, seconds) in enumerate(CLIPS.items()):
        write_video(tmp_path / "videos" / f"{clip}.mp4", _clip_frames(index, seconds), fps=12, crf=4)
    lines = [
        {"qid": k, "query": f"q{k}", "vid": clip, "duration": seconds, "relevant_windows": [[0.5, 1.5]]}
        for k, (clip, seconds) in enumerate(CLIPS.items())
    ]
    native = tmp_path / "qvh.jsonl"
    native.write_text("".join(json.dumps(line) + "\n" for line in lines))
    base = BaseConfig(dataset="qvh", cache_dir=str(tmp_path / "cache"))
    run_prepare(base, PrepareConfig(format="qvhighlights", files={"test": str(native)}, merge_sources=True))
    moment = next(q for q in read_queries(base.annotations_path) if q.query_id == "1")
    assert moment.video_id == "srcA" and moment.moments == ((3.0, 4.0),)  # clip 1 starts at 2.5 s
    config = DecodeConfig(video_dir=str(tmp_path / "videos"), size=32, workers=1, scheduler_address=scheduler)

    assert run_decode(base, config).decoded == ["srcA"]
    cache = FrameCache(base.frames_path)
    assert cache.num_frames("srcA") == 20  # ticks of [0, 6.5 s) at 3 fps: 8 + 7 + 5, no gap, no overlap
    parts = cache.attrs("srcA")["parts"]
    assert [(p["video_id"], p["first_frame"], p["frame_count"]) for p in parts] == [
        ("srcA_0.0_2.5", 0, 8),
        ("srcA_10.0_12.25", 8, 7),
        ("srcA_20.0_21.75", 15, 5),
    ]
    assert [p["offset"] for p in parts] == [0.0, 2.5, 4.75] and parts[1]["source"]["sha256"]
    frames = cache.read("srcA").astype(int)
    for tick in range(20):  # frame i shows time i / 3 of the merged timeline: the right clip, the right moment in it
        clip = sum(tick / 3 >= p["offset"] - 1e-9 for p in parts) - 1
        local_frame = np.ceil((tick / 3 - parts[clip]["offset"]) * 12 - 1e-6)
        assert abs(frames[tick, ..., 0].mean() - (60 + 60 * clip)) < 6, tick
        assert abs(frames[tick, ..., 1].mean() - 8 * local_frame) < 6, tick
    ticks = [i for i in range(20) if moment.moments[0][0] <= i / 3 < moment.moments[0][1]]
    assert ticks == [9, 10, 11] and all(abs(frames[i, ..., 0].mean() - 120) < 6 for i in ticks)

    assert run_decode(base, config).skipped == ["srcA"]  # up to date: every clip's fingerprint matches
    (tmp_path / "videos" / "srcA_20.0_21.75.mp4").unlink()
    (tmp_path / "videos" / "srcA_10.0_12.25.mp4").write_bytes(b"")
    failed = run_decode(base, replace(config, max_failures=1, size=16)).failures
    assert "file not found: 1 of its 3 clips" in failed[0].reason
    write_video(tmp_path / "videos" / "srcA_20.0_21.75.mp4", _clip_frames(2, 1.75), fps=12)
    failed = run_decode(base, replace(config, max_failures=1, size=16)).failures
    assert "clip srcA_10.0_12.25" in failed[0].reason and "empty file" in failed[0].reason
