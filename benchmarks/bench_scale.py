"""How time and memory grow with the dataset: N = 1k, 4k, 16k videos of tiny frames, about 5 queries per video.

    PYTHONPATH=. nice -n 10 python benchmarks/bench_scale.py                 # N = 1000 4000 16000 (10 min, 1 GB)
    PYTHONPATH=. python benchmarks/bench_scale.py --sizes 250 1000 --out bench_out/scale_small

Each stage runs in a fresh process per N (so its peak RSS is its own) on the real stage code:
- `prepare`: a TVR-format file of 5N captions to the unified annotations (`run_prepare`);
- `frame cache`: N videos of 8 frames of 16 px written and published as `decode` does (`write_video`);
- `features`: a tiny CLIP (16 px, one layer each tower) over every cached frame and query (`run_features`, in
  process) into the HDF5 store;
- `evaluate ProPy-sized, N videos`: 42 units x 512 per video (random, as ProPy's events would be) and 1000 queries
  (`evaluate_encoder` with PRVR ranks and moment retrieval): cost grows with the corpus;
- `evaluate ProPy-sized, 5N queries`: the same against a fixed corpus of 500 videos: cost grows with the queries;
- `evaluate baseline`: frozen CLIP MIL on the feature store, every query against every video (`run_evaluate_baseline`).
The score matrix (ranking and moment candidates, `rank_ground_truth` and `predict_moments`) is timed apart: its
cost is queries x videos by nature. Times are CPU seconds of the stage's process (one torch thread), which a shared,
loaded machine disturbs far less than wall time. Printed: CPU seconds and peak RSS per stage and N, the log-log slope
of time against N (the growth exponent; 1 = linear) for the matrix and for the rest, and the memory each process
added after its imports (its working memory), with its slope.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

UNITS, DIM = 42, 512  # ProPy's events per video (32 frames) and embedding width
FRAMES, SIZE = 8, 16  # cached frames per video and their side
QUERIES_PER_VIDEO = 5
FIXED_QUERIES, FIXED_VIDEOS = 1000, 500
TINY_CLIP = {
    "embed_dim": 32,
    "vision_width": 32,
    "vision_layers": 1,
    "patch_size": 8,
    "image_size": SIZE,
    "text_width": 32,
    "text_layers": 1,
    "context_length": 16,
}


# ----------------------------------------------------------------------------------------------------------------
# Stages (each runs in its own process)
# ----------------------------------------------------------------------------------------------------------------


def _base(root: Path) -> Any:
    from stages.data.config import BaseConfig
    from stages.models.clip_backbone import ClipArch

    arch = ClipArch(**TINY_CLIP)
    return BaseConfig(
        dataset="scale",
        cache_dir=str(root / "cache"),
        metrics_dir=str(root / "metrics"),
        clip_weights=str(root / "clip.safetensors"),
        clip_arch=arch.name,
    )


def stage_prepare(root: Path, n: int) -> dict[str, float]:
    from stages.data.prepare import PrepareConfig, run_prepare

    native = root / "native.jsonl"
    with open(native, "w") as handle:
        for v in range(n):
            for k in range(QUERIES_PER_VIDEO):
                start = 2.0 * k
                line = {"desc_id": v * QUERIES_PER_VIDEO + k, "desc": f"a shape {k} moves in clip {v}"}
                line.update(vid_name=f"video{v:06d}", duration=12.0, ts=[start, start + 2.0])
                handle.write(json.dumps(line) + "\n")
    started = time.process_time()
    run_prepare(_base(root), PrepareConfig(format="tvr", files={"test": str(native)}))
    return {"seconds": time.process_time() - started}


def stage_frames(root: Path, n: int) -> dict[str, float]:
    from stages.data.frame_cache import FrameStorage, ensure_cache, new_staging_path, publish_video, write_video

    frames_path = _base(root).frames_path
    rng = np.random.default_rng(0)
    started = time.process_time()
    ensure_cache(frames_path)
    for v in range(n):
        video_id = f"video{v:06d}"
        frames = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
        attributes = {"video_id": video_id, "fps": 3.0, "frame_count": FRAMES, "complete": True}
        staged = write_video(new_staging_path(frames_path, video_id), frames, attributes, FrameStorage())
        publish_video(staged, frames_path, video_id)
    return {"seconds": time.process_time() - started}


def stage_features(root: Path, n: int) -> dict[str, float]:
    from stages.extract.features import FeaturesConfig, run_features
    from stages.models.clip_backbone import ClipArch, save_clip

    base = _base(root)
    if not Path(base.clip_weights).is_file():
        torch.manual_seed(0)
        save_clip(ClipArch(**TINY_CLIP).build(), base.clip_weights)
    started = time.process_time()
    run_features(base, FeaturesConfig(device="cpu", workers=0))
    return {"seconds": time.process_time() - started}


class RandomUnits:
    """A ProPy-sized encoder: [b, 42, 512] units per batch of videos, drawn from the batch's own seed."""

    unit_windows = torch.stack([torch.arange(UNITS) / UNITS, (torch.arange(UNITS) + 1) / UNITS], dim=1)

    def encode_videos(self, rows: range) -> torch.Tensor:
        generator = torch.Generator().manual_seed(rows.start)
        return torch.randn(len(rows), UNITS, DIM, generator=generator)

    def encode_queries(self, rows: range) -> torch.Tensor:
        generator = torch.Generator().manual_seed(10**9 + rows.start)
        return torch.randn(len(rows), DIM, generator=generator)


def _timed_matrix(matrix: dict[str, float]) -> None:
    """Time the score-matrix functions the evaluator calls (ranking and moment candidates)."""
    from stages.evaluate import evaluator

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                matrix["seconds"] += time.process_time() - started

        return wrapper

    evaluator.rank_ground_truth = timed(evaluator.rank_ground_truth)
    evaluator.predict_moments = timed(evaluator.predict_moments)


def _propy_sized(num_videos: int, num_queries: int) -> dict[str, float]:
    from stages.evaluate.evaluator import EvalConfig, evaluate_encoder
    from stages.evaluate.retrieval import ScoringConfig

    matrix = {"seconds": 0.0}
    _timed_matrix(matrix)
    rng = np.random.default_rng(0)
    gt_video = torch.from_numpy(rng.integers(0, num_videos, num_queries))
    durations = torch.from_numpy(rng.uniform(30, 150, num_videos))
    starts = rng.uniform(0, 20, num_queries)
    gt_windows = [torch.tensor([[s, s + 10.0]], dtype=torch.float64) for s in starts]
    videos = [range(i, min(i + 16, num_videos)) for i in range(0, num_videos, 16)]
    queries = [range(i, min(i + 256, num_queries)) for i in range(0, num_queries, 256)]
    config = EvalConfig(scoring=ScoringConfig(device="cpu"), measure_efficiency=False)
    started = time.process_time()
    metrics = evaluate_encoder(RandomUnits(), videos, queries, gt_video, config, durations, gt_windows)
    assert metrics["num_queries"] == num_queries and "moments" in metrics
    return {"seconds": time.process_time() - started, "matrix_seconds": matrix["seconds"]}


def stage_propy_corpus(root: Path, n: int) -> dict[str, float]:
    return _propy_sized(n, FIXED_QUERIES)


def stage_propy_queries(root: Path, n: int) -> dict[str, float]:
    return _propy_sized(FIXED_VIDEOS, QUERIES_PER_VIDEO * n)


def stage_baseline(root: Path, n: int) -> dict[str, float]:
    from stages.evaluate.evaluator import EvalConfig, EvaluateConfig
    from stages.evaluate.retrieval import ScoringConfig
    from stages.train.train_baseline import BaselineStageConfig, run_evaluate_baseline

    matrix = {"seconds": 0.0}
    _timed_matrix(matrix)
    protocol = EvalConfig(split="test", scoring=ScoringConfig(device="cpu"), measure_efficiency=False)
    evaluation = EvaluateConfig(protocol, also_splits=(), untrained_reference=False, batch_videos=256)
    started = time.process_time()
    metrics = run_evaluate_baseline(_base(root), "clip_mil", BaselineStageConfig(), evaluation)
    assert metrics["num_queries"] == QUERIES_PER_VIDEO * n
    return {"seconds": time.process_time() - started, "matrix_seconds": matrix["seconds"]}


STAGES: dict[str, tuple[str, Callable[[Path, int], dict[str, float]]]] = {
    "prepare": ("prepare (5N queries)", stage_prepare),
    "frames": ("frame cache write (N videos)", stage_frames),
    "features": ("features (N videos, 5N queries)", stage_features),
    "propy_corpus": (f"evaluate ProPy-sized: N videos, {FIXED_QUERIES} queries", stage_propy_corpus),
    "propy_queries": (f"evaluate ProPy-sized: {FIXED_VIDEOS} videos, 5N queries", stage_propy_queries),
    "baseline": ("evaluate baseline (clip_mil): N videos, 5N queries", stage_baseline),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(stage: str, root: Path, n: int) -> None:
    """Run one stage and print its numbers as one JSON line (the last line of stdout)."""
    torch.set_num_threads(1)
    import stages.evaluate.evaluator  # noqa: F401 - imports before the memory baseline
    import stages.extract.features  # noqa: F401
    import stages.train.train_baseline  # noqa: F401

    at_start = _rss_mb()
    result = STAGES[stage][1](root, n)
    print(json.dumps({**result, "rss_start_mb": at_start, "rss_peak_mb": _rss_mb()}))


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def slope(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size)."""
    x = np.log(np.asarray(sizes, float))
    y = np.log(np.maximum(np.asarray(values, float), 1e-9))
    return float(np.polyfit(x, y, 1)[0])


def run_stage(stage: str, root: Path, n: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", stage, "--root", str(root), "--n", str(n)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout, _ = process.communicate()
    if process.returncode:
        alone = f"PYTHONPATH=. {' '.join(command)}"
        raise SystemExit(f"{stage} at N={n} failed (exit {process.returncode}); run it alone to see why:\n{alone}")
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--out", type=Path, default=Path("bench_out/scale"))
    parser.add_argument("--child", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.n)
        return
    results: dict[str, dict[int, dict[str, float]]] = {stage: {} for stage in STAGES}
    walls = {}
    for n in args.sizes:
        root = args.out / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        started = time.perf_counter()
        for stage in STAGES:
            results[stage][n] = run_stage(stage, root, n)
            print(f"N={n} {stage}: {results[stage][n]}", file=sys.stderr, flush=True)
        walls[n] = time.perf_counter() - started
    report(args.sizes, results)
    print(
        "wall time of all stages (process starts included): "
        + ", ".join(f"N={n} {w / 60:.1f} min" for n, w in walls.items())
    )


def report(sizes: list[int], results: dict[str, dict[int, dict[str, float]]]) -> None:
    """The table, then an extrapolation to TVR and to a 100K-video corpus."""
    head = " | ".join(f"N={n} s" for n in sizes)
    print(f"| stage (CPU seconds) | {head} | time exponent | peak RSS MB | working MB | memory exponent |")
    print("|---|" + "---|" * (len(sizes) + 4))
    for stage, (label, _) in STAGES.items():
        rows = results[stage]
        peak = [rows[n]["rss_peak_mb"] for n in sizes]
        working = [rows[n]["rss_peak_mb"] - rows[n]["rss_start_mb"] for n in sizes]
        parts = [("", [rows[n]["seconds"] for n in sizes])]
        if "matrix_seconds" in rows[sizes[0]]:
            matrix = [rows[n]["matrix_seconds"] for n in sizes]
            rest = [rows[n]["seconds"] - rows[n]["matrix_seconds"] for n in sizes]
            parts = [(": score matrix", matrix), (": the rest", rest)]
        for suffix, seconds in parts:
            cells = " | ".join(f"{s:.2f}" for s in seconds)
            memory = f"{'/'.join(f'{p:.0f}' for p in peak)} | {'/'.join(f'{w:.0f}' for w in working)}"
            growth = slope(sizes, [max(w, 1.0) for w in working])
            print(f"| {label}{suffix} | {cells} | {slope(sizes, seconds):.2f} | {memory} | {growth:.2f} |")
    largest = sizes[-1]
    corpus = results["propy_corpus"][largest]
    pairs_per_s = FIXED_QUERIES * largest / corpus["matrix_seconds"]
    per_video = {s: results[s][largest]["seconds"] / largest for s in ("frames", "features")}
    per_query = results["prepare"][largest]["seconds"] / (QUERIES_PER_VIDEO * largest)
    print(f"\nProPy-sized score matrix: {pairs_per_s:,.0f} query-video pairs/s ({UNITS} units x {DIM}, CPU, 1 thread)")
    for name, videos, queries in (("TVR", 21_800, 109_000), ("100K videos", 100_000, 500_000)):
        embeddings = videos * UNITS * DIM * 4 / 2**30
        full = queries * videos * UNITS * 4 / 2**30
        print(
            f"{name} ({videos:,} videos, {queries:,} queries): matrix {queries * videos / pairs_per_s / 3600:.1f} h "
            f"on this CPU thread; prepare {queries * per_query:.0f} s; frame cache write "
            f"{videos * per_video['frames'] / 60:.1f} min and features {videos * per_video['features'] / 60:.1f} min "
            f"at these tiny sizes; corpus embeddings {embeddings:.1f} GiB fp32 (the whole "
            f"[Nq, Nv, {UNITS}] unit scores would be {full:,.0f} GiB; evaluation holds one tile of it)"
        )
    print(f"\nload {os.getloadavg()[0]:.1f} (1-min average) on {os.cpu_count()} CPUs; one torch thread per stage")


if __name__ == "__main__":
    main()
