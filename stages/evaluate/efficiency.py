"""Efficiency probes: parameters, storage per video and per-query latency (matching and end to end).

Protocol (docs/baselines_official_code.md §2.4; ProPy Table 11, Prototypes Table 3):
- parameters: trainable and total of the model's nn.Module;
- storage per video: cached vectors x dim x bytes per element, exact from the embedding shape and dtype;
- matching: the time to score a batch of precomputed query embeddings against a corpus of precomputed video
  embeddings and take each query's top `top_k` videos, divided by the batch size;
- end to end: encoding the batch of queries from its raw input (text) plus matching, divided by the batch size.
Each of `repeats` runs (after one warm-up run) times the encoding and then the matching of the freshly encoded
queries, with CUDA synchronised around each part, at each stated corpus size; the corpora are random tensors of the
real per-video shape and dtype, so any size can be probed. Reported per size: the median of each part over the runs
and its interquartile range (`*_iqr`); the total is the sum of the two medians, so the parts add up (its IQR is that
of the runs' sums). Video encoding
is offline and excluded.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from stages.evaluate.retrieval import ScoreFn, ScoringConfig, resolve_device, top_videos

T = TypeVar("T")


@dataclass(frozen=True)
class EfficiencyConfig:
    """What the efficiency probe measures."""

    corpus_sizes: tuple[int, ...] = (1000, 10000, 100000)  # videos in each synthetic corpus
    repeats: int = 5  # timed runs per measurement (the median is reported), after one warm-up run
    top_k: int = 100  # videos returned per query by the matching step
    seed: int = 0  # seed of the synthetic corpora


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """Trainable and total parameters of a module (shared parameters counted once)."""
    parameters = list(module.parameters())
    return {
        "params_trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "params_total": sum(p.numel() for p in parameters),
    }


def bytes_per_video(video_shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes cached per video for embeddings of per-video shape `video_shape` (e.g. [K, E]) and `dtype`."""
    return math.prod(video_shape) * torch.empty((), dtype=dtype).element_size()


def synthetic_corpus(
    num_videos: int, video_shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> Tensor:
    """A random [num_videos, *video_shape] corpus, drawn on `device` in pieces of at most 2**26 elements."""
    corpus = torch.empty((num_videos, *video_shape), dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    step = max(1, 2**26 // max(1, math.prod(video_shape)))
    for first in range(0, num_videos, step):
        piece = corpus[first : first + step]
        piece.copy_(torch.randn(piece.shape, generator=generator, device=device))
    return corpus


def timed_ms(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """`fn()` and its wall time in milliseconds, synchronising CUDA before and after."""
    _synchronize(device)
    began = time.perf_counter()
    result = fn()
    _synchronize(device)
    return result, (time.perf_counter() - began) * 1000.0


def median_and_iqr(values: Sequence[float]) -> tuple[float, float]:
    """The median of `values` and their interquartile range (0 for a single value)."""
    if len(values) < 2:
        return float(values[0]), 0.0
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), quartiles[2] - quartiles[0]


def probe_latency(
    query_embeddings: Tensor,
    video_shape: Sequence[int],
    video_dtype: torch.dtype,
    config: EfficiencyConfig,
    scoring: ScoringConfig,
    score_fn: ScoreFn | None = None,
    encode_queries: Callable[[], Tensor] | None = None,
) -> dict[str, Any]:
    """Per-query matching (and, given `encode_queries`, encoding and total) latency at every corpus size.

    Args:
        query_embeddings: [q, E] precomputed embeddings of one query batch (the batch size of the timing); matched
            when there is no `encode_queries`.
        video_shape: per-video embedding shape, e.g. [K, E].
        video_dtype: dtype of the cached video embeddings.
        config: corpus sizes, repeats, top-k.
        scoring: device and memory budget of the matching.
        score_fn: the model's own similarity, if not the max-over-units cosine.
        encode_queries: encodes the same query batch from its raw input (text); each run times it, then the matching
            of what it returned.

    Returns:
        {"query_batch", "device", "repeats", "matching_ms_per_query": {size: median}, "matching_ms_per_query_iqr":
        {size: IQR}, with `encode_queries` also "encoding_ms_per_query", "encoding_ms_per_query_iqr" and
        "total_ms_per_query" (encoding + matching medians) with "total_ms_per_query_iqr" (of the runs' sums), and
        "peak_gpu_mb": {size: MiB} on CUDA}, sizes as strings.
    """
    device = resolve_device(scoring.device)
    batch = query_embeddings.shape[0]
    queries = query_embeddings.to(device)
    parts = ("encoding", "matching") if encode_queries is not None else ("matching",)
    result: dict[str, Any] = {"query_batch": batch, "device": str(device), "repeats": max(1, config.repeats)}
    for part in parts:
        result[f"{part}_ms_per_query"], result[f"{part}_ms_per_query_iqr"] = {}, {}
    if encode_queries is not None:
        result["total_ms_per_query"], result["total_ms_per_query_iqr"] = {}, {}
    if device.type == "cuda":
        result["peak_gpu_mb"] = {}
    for size in config.corpus_sizes:
        corpus = synthetic_corpus(size, video_shape, video_dtype, device, config.seed)

        def run(corpus: Tensor = corpus) -> dict[str, float]:
            times = {}
            encoded = queries
            if encode_queries is not None:
                encoded, times["encoding"] = timed_ms(lambda: encode_queries().to(device), device)
            _, times["matching"] = timed_ms(
                lambda: top_videos(encoded, corpus, config.top_k, scoring, score_fn, progress=False), device
            )
            return times

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            run()  # warm-up
            runs = [run() for _ in range(result["repeats"])]
        key = str(size)
        for part in parts:
            median, iqr = median_and_iqr([times[part] / batch for times in runs])
            result[f"{part}_ms_per_query"][key], result[f"{part}_ms_per_query_iqr"][key] = median, iqr
        if encode_queries is not None:
            result["total_ms_per_query"][key] = sum(result[f"{part}_ms_per_query"][key] for part in parts)
            result["total_ms_per_query_iqr"][key] = median_and_iqr([sum(times.values()) / batch for times in runs])[1]
        if device.type == "cuda":
            result["peak_gpu_mb"][key] = torch.cuda.max_memory_allocated(device) / 2**20
        del corpus
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
