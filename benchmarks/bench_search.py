"""Search at scale: exact and approximate ms/query, recall@10 of approximate vs exact, bytes per video, build time.

    PYTHONPATH=. nice -n 10 python benchmarks/bench_search.py                        # 10k, 100k and 1M videos
    PYTHONPATH=. python benchmarks/bench_search.py --videos 10000 --queries 100      # one size
    PYTHONPATH=. python benchmarks/bench_search.py --workdir /big/disk               # where the stores go (1M: 31 GB)

Each size writes a real search store (`stages/search/store.py`: fp16 units in a memory-mapped file on disk, so 1M
videos never sit in memory), builds the approximate index with the `index` command's code (`build_ann`) and queries
it with the `search` command's engine. Videos have 19 to 42 units of 512 dimensions (ProPy's pyramids of 16 and 32
frames), generated chunk by chunk from seeds: 1024 topic centres (norm 1); a video is its topic's centre plus an
offset of norm 0.6 in a shared 128-dimensional subspace; its units are the video plus another such offset (norm 0.5),
L2-normalised. A query is one unit of a random video plus isotropic noise of norm 0.8, so that the videos of its
topic (10 at 10k videos, 1000 at 1M) compete for its top 10.

Ground truth is the engine's exact scan of the whole store (fp32, streamed chunk by chunk; one pass for every query);
"exact ms/query" times single queries through the fp16 scan (what `search` does below `ann.min_units`);
"approximate ms/query" times single queries through FAISS IVF-PQ, candidate videos and their exact re-scoring.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages.search.ann import ANN_FILE, AnnConfig, AnnIndex, build_ann
from stages.search.engine import EngineConfig, SearchEngine
from stages.search.store import StoreWriter, UnitStore, VideoRecord

DIM, TOPICS, RANK = 512, 1024, 128
VIDEO_SPREAD, UNIT_SPREAD, QUERY_NOISE = 0.6, 0.5, 0.8  # offset norms relative to a topic centre's
MIN_UNITS, MAX_UNITS = 19, 42
CHUNK_VIDEOS = 8192


def unit_counts(num_videos: int, seed: int) -> np.ndarray:
    """Units of each video (19..42)."""
    return np.random.default_rng([seed, 0]).integers(MIN_UNITS, MAX_UNITS + 1, num_videos)


def generate_chunk(first: int, lengths: np.ndarray, seed: int, basis: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [sum(lengths), DIM] units of videos first, first + 1, ... (deterministic in seed and first)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + first)
    topics = torch.randint(0, TOPICS, (len(lengths),), generator=generator)
    videos = (
        basis["centres"][topics] + VIDEO_SPREAD * torch.randn(len(lengths), RANK, generator=generator) @ basis["mix"]
    )
    units = videos.repeat_interleave(torch.from_numpy(lengths), dim=0)
    units += UNIT_SPREAD * torch.randn(len(units), RANK, generator=generator) @ basis["mix"]
    return F.normalize(units, dim=-1)


def make_basis(seed: int) -> dict[str, torch.Tensor]:
    """Topic centres (norm ~1) and the subspace videos and units vary in (offsets of norm ~1 before scaling)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "centres": torch.randn(TOPICS, DIM, generator=generator) / DIM**0.5,
        "mix": torch.randn(RANK, DIM, generator=generator) / (DIM * RANK) ** 0.5,
    }


def write_store(directory: Path, num_videos: int, seed: int) -> UnitStore:
    lengths = unit_counts(num_videos, seed)
    writer = StoreWriter(directory, int(lengths.sum()), num_videos, DIM)
    basis = make_basis(seed)
    for first in tqdm(range(0, num_videos, CHUNK_VIDEOS), desc=f"store {num_videos}", unit="chunk", leave=False):
        chunk = lengths[first : first + CHUNK_VIDEOS]
        units = generate_chunk(first, chunk, seed, basis).half().numpy()
        records = [
            VideoRecord(f"v{first + i}", f"v{first + i}.mp4", f"v{first + i}", {}, 60.0, 180, int(n))
            for i, n in enumerate(chunk)
        ]
        windows = np.zeros((len(units), 2), np.float32)
        writer.add(records, units, windows, np.zeros(len(units), np.int32))
    writer.finish()
    writer.publish()
    return UnitStore.open(directory)


def make_queries(store: UnitStore, count: int, seed: int) -> torch.Tensor:
    """Units of random videos plus isotropic noise (norm QUERY_NOISE), L2-normalised."""
    rng = np.random.default_rng([seed, 1])
    units = torch.from_numpy(np.asarray(store.units[np.sort(rng.integers(0, store.num_units, count))], np.float32))
    noise = QUERY_NOISE * torch.from_numpy(rng.standard_normal((count, DIM)).astype(np.float32)) / DIM**0.5
    return F.normalize(units + noise, dim=-1)


def timed(fn: Callable[[int], Any], repeats: int) -> tuple[float, list]:
    """Median ms of fn(i) over i < repeats, and the results."""
    times, results = [], []
    for i in range(repeats):
        start = time.perf_counter()
        results.append(fn(i))
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times)), results


def run_size(num_videos: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    directory = workdir / f"store_{num_videos}"
    started = time.perf_counter()
    store = write_store(directory, num_videos, args.seed)
    write_s = time.perf_counter() - started
    queries = make_queries(store, args.queries, args.seed)
    ann_config = AnnConfig(
        min_units=1, probes=args.probes, candidate_units=args.candidate_units, candidate_videos=args.candidate_videos
    )
    started = time.perf_counter()
    build_ann(store.units, ann_config, directory / ANN_FILE)
    build_s = time.perf_counter() - started
    ann = AnnIndex(directory / ANN_FILE, ann_config)
    exact = SearchEngine(store, None, EngineConfig(memory_budget_mb=2048))
    approximate = SearchEngine(store, None, EngineConfig(), ann)
    truth = exact.search(queries, 10, exact=True)  # one fp32 pass for every query
    exact_ms, exact_single = timed(lambda i: exact.search(queries[i : i + 1], 10, exact=True)[0], args.exact_repeats)
    assert [[m.video for m in r] for r in exact_single] == [[m.video for m in r] for r in truth[: args.exact_repeats]]
    approx_ms, found = timed(lambda i: approximate.search(queries[i : i + 1], 10)[0], len(queries))
    recall = np.mean([len({m.video for m in a} & {m.video for m in t}) / 10 for a, t in zip(found, truth, strict=True)])
    store_bytes = sum(
        directory.joinpath(name).stat().st_size
        for name in ("units.npy", "windows.npy", "thumbs.npy", "offsets.npy", "videos.jsonl")
    )
    row = {
        "videos": num_videos,
        "units": store.num_units,
        "lists": ann_config.num_lists(store.num_units),
        "exact_ms": exact_ms,
        "approx_ms": approx_ms,
        "recall10": float(recall),
        "store_bytes_per_video": store_bytes / num_videos,
        "ann_bytes_per_video": ann.nbytes / num_videos,
        "build_s": build_s,
        "write_s": write_s,
    }
    shutil.rmtree(directory)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200, help="queries for recall and approximate timing")
    parser.add_argument("--exact-repeats", type=int, default=3, help="single queries timed through the exact scan")
    defaults = AnnConfig()  # the index command's defaults (params.yaml search.ann)
    parser.add_argument("--probes", type=int, default=defaults.probes)
    parser.add_argument("--candidate-units", type=int, default=defaults.candidate_units)
    parser.add_argument("--candidate-videos", type=int, default=defaults.candidate_videos)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (1: robust on a shared box)")
    parser.add_argument("--workdir", default=None, help="folder for the stores (default: the system temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(
        f"torch threads {torch.get_num_threads()}; queries {args.queries}; probes {args.probes}; "
        f"candidates {args.candidate_units} units -> {args.candidate_videos} videos"
    )
    header = (
        f"{'videos':>9} {'units':>11} {'lists':>5} {'exact ms/q':>10} {'approx ms/q':>11} {'recall@10':>9} "
        f"{'store B/video':>13} {'ANN B/video':>11} {'ANN build s':>11} {'store write s':>13}"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_search_") as workdir:
        for num_videos in args.videos:
            r = run_size(num_videos, args, Path(workdir))
            print(
                f"{r['videos']:>9} {r['units']:>11} {r['lists']:>5} {r['exact_ms']:>10.1f} {r['approx_ms']:>11.2f} "
                f"{r['recall10']:>9.3f} {r['store_bytes_per_video']:>13.0f} {r['ann_bytes_per_video']:>11.0f} "
                f"{r['build_s']:>11.1f} {r['write_s']:>13.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
