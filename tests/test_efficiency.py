"""Efficiency probes: parameter counts, storage per video, synthetic corpora and per-query latency."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from stages.evaluate.efficiency import (
    EfficiencyConfig,
    bytes_per_video,
    median_and_iqr,
    parameter_counts,
    probe_latency,
    synthetic_corpus,
    timed_ms,
)
from stages.evaluate.retrieval import ScoringConfig

CPU = ScoringConfig(device="cpu")


def test_parameter_counts_split_trainable_and_count_shared_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.Linear(10, 3))
    model[1].weight = model[0].weight  # tied: counted once
    model[0].requires_grad_(False)
    assert parameter_counts(model) == {"params_trainable": 10 * 3 + 3, "params_total": 10 * 4 + 10 * 3 + 3}


def test_bytes_per_video_is_vectors_times_dim_times_bytes() -> None:
    assert bytes_per_video((42, 512), torch.float32) == 42 * 512 * 4  # ProPy: 84 KiB per video
    assert bytes_per_video(torch.Size([33, 384]), torch.float16) == 33 * 384 * 2
    assert bytes_per_video((1, 512), torch.float32) == 2048


def test_synthetic_corpus_is_seeded_and_shaped() -> None:
    corpus = synthetic_corpus(7, (3, 5), torch.float16, torch.device("cpu"), seed=1)
    assert corpus.shape == (7, 3, 5) and corpus.dtype == torch.float16
    assert torch.equal(corpus, synthetic_corpus(7, (3, 5), torch.float16, torch.device("cpu"), seed=1))
    assert corpus.float().std() > 0.5


def test_timed_ms_returns_the_result_and_the_time() -> None:
    def work() -> str:
        time.sleep(0.004)
        return "done"

    result, elapsed = timed_ms(work, torch.device("cpu"))
    assert result == "done" and 4.0 <= elapsed < 200.0


def test_median_and_iqr() -> None:
    assert median_and_iqr([3.0]) == (3.0, 0.0)
    assert median_and_iqr([5.0, 1.0, 2.0, 4.0, 3.0]) == (3.0, 2.0)  # quartiles 2 and 4


def test_probe_latency_times_encoding_and_matching_in_the_same_runs() -> None:
    queries = torch.randn(4, 16)
    calls = []

    def encode_queries() -> Tensor:
        calls.append(1)
        time.sleep(0.02)  # a slow text encoder: 5 ms per query
        return queries

    config = EfficiencyConfig(corpus_sizes=(100, 2000), repeats=3, top_k=10)
    result = probe_latency(queries, (6, 16), torch.float32, config, CPU, encode_queries=encode_queries)
    assert result["query_batch"] == 4 and result["device"] == "cpu" and result["repeats"] == 3
    assert len(calls) == 2 * (1 + 3)  # per size: one warm-up run and three timed runs, each encoding once
    encoding, matching, total = (result[f"{part}_ms_per_query"] for part in ("encoding", "matching", "total"))
    assert set(encoding) == set(matching) == set(total) == set(result["matching_ms_per_query_iqr"]) == {"100", "2000"}
    for size in ("100", "2000"):
        assert 5.0 <= encoding[size] < 1000 and 0 < matching[size] < 1000
        assert total[size] == encoding[size] + matching[size]  # the parts add up
        assert result["encoding_ms_per_query_iqr"][size] >= 0 and result["total_ms_per_query_iqr"][size] >= 0
    assert "peak_gpu_mb" not in result


def test_probe_latency_with_a_custom_score_fn_and_no_encoder() -> None:
    seen = []

    def score_fn(queries: Tensor, videos: Tensor) -> Tensor:
        seen.append(videos.shape)
        return queries @ videos.mean(1).T

    result = probe_latency(
        torch.randn(2, 8), (3, 8), torch.float32, EfficiencyConfig(corpus_sizes=(50,), repeats=1), CPU, score_fn
    )
    assert seen and all(shape[1:] == (3, 8) for shape in seen)
    assert set(result) == {"query_batch", "device", "repeats", "matching_ms_per_query", "matching_ms_per_query_iqr"}
