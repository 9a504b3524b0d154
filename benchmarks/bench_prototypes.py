"""Cost of each Prototypes component: one training step (forward + backward) per row of the paper's Table 4.

    PYTHONPATH=. python benchmarks/bench_prototypes.py                     # CPU, 16 videos x 5 queries, 1 thread
    PYTHONPATH=. python benchmarks/bench_prototypes.py --device cuda --videos 128 --prototypes 10 30 60

Random features with the shapes of the real inputs (512-d CLIP rows, 128 frames, 32 clips, 30 tokens per query);
the Table 8 defaults otherwise. Prints parameters, stored bytes per video and the median step time of each
configuration, with its ratio to the baseline row (prototype generator and retrieval loss only), all in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from stages.models.baselines.data import QueryBatch, TrainBatch, VideoBatch
from stages.models.baselines.losses import NegativeSampling
from stages.models.baselines.prototypes import Prototypes, PrototypesConfig

TABLE_4 = {
    "baseline": {"cross_recon": False, "uni_recon": False, "guidance": False, "ortho": False},
    "+C.Recon": {"uni_recon": False, "guidance": False, "ortho": False},
    "+U.Recon": {"guidance": False, "ortho": False},
    "+Guide": {"ortho": False},
    "+P.Div (full)": {},
}


def random_batch(cfg: PrototypesConfig, videos: int, queries_per_video: int, device: torch.device) -> TrainBatch:
    """Videos of `max_ctx_l` frames and queries of `max_desc_l` tokens (every row valid)."""
    num_queries = videos * queries_per_video
    video_batch = VideoBatch(
        [str(i) for i in range(videos)],
        torch.randn(videos, cfg.map_size, cfg.visual_input_size),
        torch.randn(videos, cfg.max_ctx_l, cfg.visual_input_size),
        torch.ones(videos, cfg.max_ctx_l),
    )
    query_batch = QueryBatch(
        [str(i) for i in range(num_queries)],
        torch.randn(num_queries, cfg.max_desc_l, cfg.query_input_size),
        torch.ones(num_queries, cfg.max_desc_l),
        torch.arange(videos).repeat_interleave(queries_per_video),
    )
    return TrainBatch(video_batch, query_batch).to(device)


def step_ms(model: Prototypes, batch: TrainBatch, repeats: int, device: torch.device) -> float:
    """Median milliseconds of one forward + backward pass."""
    times = []
    for index in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss, _ = model.training_loss(batch, NegativeSampling())
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:  # the first pass warms up
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--queries-per-video", type=int, default=5)
    parser.add_argument("--prototypes", type=int, nargs="+", default=[30])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.videos} videos x {args.queries_per_video} queries, {args.threads} CPU thread(s)")
    for count in args.prototypes:
        base = PrototypesConfig(num_prototypes=count)
        batch = random_batch(base, args.videos, args.queries_per_video, device)
        reference = None
        for row, switches in TABLE_4.items():
            model = Prototypes(dataclasses.replace(base, **switches)).to(device).train()
            with torch.no_grad():
                stored = model.eval().encode_videos(batch.videos)[0]
            model.train()
            ms = step_ms(model, batch, args.repeats, device)
            reference = reference or ms
            params = sum(p.numel() for p in model.parameters())
            print(
                f"L_p={count:3d}  {row:14s} params {params / 1e6:5.2f} M  stored {stored.numel() * 4 / 1e6:.3f} MB"
                f"  step {ms:8.1f} ms  x{ms / reference:.2f}"
            )


if __name__ == "__main__":
    main()
