"""Efficiency probes: parameter counts, storage per video, synthetic corpora and per-query latency."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from stages.evaluate.efficiency import (
    EfficiencyConfig,
    bytes_per_video,
    median_ms,
    parameter_counts,
    probe_latency,
    synthetic_corpus,
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


def test_median_ms_times_the_call() -> None:
    calls = []

    def work() -> None:
        calls.append(1)
        time.sleep(0.004)

    elapsed = median_ms(work, repeats=3, device=torch.device("cpu"))
    assert len(calls) == 4  # one warm-up, three timed
    assert 4.0 <= elapsed < 200.0


def test_probe_latency_reports_per_query_times_at_each_size() -> None:
    queries = torch.randn(4, 16)

    def encode_queries() -> Tensor:
        time.sleep(0.02)  # a slow text encoder: 5 ms per query
        return queries

    config = EfficiencyConfig(corpus_sizes=(100, 2000), repeats=2, top_k=10)
    result = probe_latency(queries, (6, 16), torch.float32, config, CPU, encode_queries=encode_queries)
    assert result["query_batch"] == 4 and result["device"] == "cpu"
    matching, total = result["matching_ms_per_query"], result["total_ms_per_query"]
    assert set(matching) == set(total) == {"100", "2000"}
    for size in ("100", "2000"):
        assert 0 < matching[size] < 1000
        assert total[size] >= 5.0  # the encoder alone takes 5 ms per query
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
    assert set(result) == {"query_batch", "device", "matching_ms_per_query"}
