"""Cost of the synthetic dataset: planning, rendering and encoding per video, and a whole small dataset.

    python benchmarks/bench_synth.py --videos 24

Prints wall and CPU seconds (CPU time is the better guide on a shared machine) and the projected time of the
default dataset (params.yaml `synth`) on this machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.data.config import BaseConfig  # noqa: E402
from stages.synthetic.synth import SynthConfig, plan_dataset, run_synth, write_video  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24, help="videos in the timed run")
    args = parser.parse_args()
    default = SynthConfig()
    total = sum(default.videos_in(s) for s in ("train", "val", "test"))

    wall, cpu = time.perf_counter(), time.process_time()
    plans = plan_dataset(42, default)
    print(f"plan {total} videos: {time.perf_counter() - wall:.2f}s wall, {time.process_time() - cpu:.2f}s cpu")

    sample = plans[: args.videos]
    frames = sum(p.n_frames for p in sample)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = time.process_time()
        for plan in sample:
            plan.frames()
        render_cpu = time.process_time() - cpu
        cpu = time.process_time()
        for plan in sample:
            write_video(plan, Path(tmp) / f"{plan.video_id}.mp4")
        write_cpu = time.process_time() - cpu
    per_video = write_cpu / len(sample)
    print(
        f"{len(sample)} videos, {frames / len(sample):.0f} frames each: cpu per video "
        f"{1e3 * render_cpu / len(sample):.0f} ms render, {1e3 * per_video:.0f} ms render + encode"
    )
    print(
        f"projected default dataset ({total} videos): {per_video * total:.0f} cpu-s, "
        f"about {per_video * total / 2:.0f}s on 2 idle cores"
    )

    for workers in (1, 2):
        cfg = replace(default, train_videos=args.videos, val_videos=0, test_videos=0, workers=workers)
        with tempfile.TemporaryDirectory() as tmp:
            wall = time.perf_counter()
            run_synth(BaseConfig(), replace(cfg, root=tmp))
            print(f"run_synth {args.videos} videos, workers={workers}: {time.perf_counter() - wall:.1f}s wall")


if __name__ == "__main__":
    main()
