"""Chunked scoring (max-over-units cosine, raw unit norms, custom score functions), rank-only path, and the
model-agnostic evaluation runner on a toy encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.data.errors import PipelineError
from stages.data.schema import Query
from stages.evaluate.efficiency import EfficiencyConfig
from stages.evaluate.evaluator import EvalConfig, RetrievalEncoder, evaluate_encoder, ground_truth, write_metrics
from stages.evaluate.metrics import gt_ranks, prvr_metrics
from stages.evaluate.retrieval import (
    ScoringConfig,
    max_unit_similarity,
    plan_chunks,
    rank_ground_truth,
    similarity_matrix,
    top_videos,
)

SMALL = ScoringConfig(memory_budget_mb=0.02, device="cpu")  # several query blocks and video tiles
LARGE = ScoringConfig(memory_budget_mb=512, device="cpu")  # one block, one tile


@pytest.fixture()
def data() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(40, 8, generator=generator)
    videos = torch.randn(60, 5, 8, generator=generator) * torch.rand(60, 5, 1, generator=generator) * 3
    gt = torch.randint(0, 60, (40,), generator=generator)
    return queries, videos, gt


def test_max_unit_similarity_is_the_best_unit_cosine(data) -> None:
    queries, videos, _ = data
    scores, best = max_unit_similarity(queries[:3], videos[:4])
    for i in range(3):
        for j in range(4):
            cosines = F.cosine_similarity(queries[i].expand(5, -1), videos[j], dim=-1)
            assert scores[i, j] == pytest.approx(float(cosines.max()), abs=1e-6)
            assert int(best[i, j]) == int(cosines.argmax())


def test_raw_unit_norms_reproduce_the_activitynet_defect(data) -> None:
    queries, videos, _ = data
    raw, _ = max_unit_similarity(queries, videos, normalize_units=False)
    expected = (F.normalize(queries, dim=-1) @ videos.reshape(-1, 8).T).view(40, 60, 5).amax(-1)
    torch.testing.assert_close(raw, expected)
    scaled = videos.clone()
    scaled[7] *= 10
    torch.testing.assert_close(
        max_unit_similarity(queries, scaled)[0][:, 7], max_unit_similarity(queries, videos)[0][:, 7]
    )
    torch.testing.assert_close(max_unit_similarity(queries, scaled, normalize_units=False)[0][:, 7], raw[:, 7] * 10)


def test_plan_chunks_splits_within_the_budget() -> None:
    assert plan_chunks(40, 60, (5, 8), 0.02) == (10, 20)
    assert plan_chunks(40, 60, (5, 8), 512) == (40, 60)
    assert plan_chunks(10, 100_000, (42, 512), 1e-3) == (1, 1)  # never below one query and one video


def test_chunked_equals_unchunked(data) -> None:
    queries, videos, _ = data
    full, full_best = similarity_matrix(queries, videos, LARGE, with_best_unit=True)
    chunked, chunked_best = similarity_matrix(queries, videos, SMALL, with_best_unit=True)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    assert torch.equal(chunked_best, full_best)
    raw = similarity_matrix(queries, videos, ScoringConfig(memory_budget_mb=0.02, normalize_units=False))[0]
    torch.testing.assert_close(raw, max_unit_similarity(queries, videos, normalize_units=False)[0], rtol=0, atol=1e-5)


def test_rank_only_path_equals_the_full_matrix_path(data) -> None:
    queries, videos, gt = data
    full, _ = similarity_matrix(queries, videos, LARGE)
    ranks = rank_ground_truth(queries, videos, gt, SMALL)
    assert torch.equal(ranks, gt_ranks(full, gt))
    assert ranks.min() >= 1 and ranks.max() <= 60


def test_rank_only_path_keeps_the_stable_tie_rule() -> None:
    videos = torch.zeros(30, 1, 4)
    videos[:, :, 0] = 2.0  # every video scores exactly 1 for every query
    queries = torch.zeros(3, 4)
    queries[:, 0] = 1.0
    gt = torch.tensor([0, 7, 29])
    assert rank_ground_truth(queries, videos, gt, SMALL).tolist() == [1, 8, 30]


def test_custom_score_fn_fuses_two_scales(data) -> None:
    queries, videos, gt = data

    def fused(query_block: Tensor, video_block: Tensor) -> Tensor:  # clip units 0..2, frame units 3..4
        clip = max_unit_similarity(query_block, video_block[:, :3])[0]
        frame = max_unit_similarity(query_block, video_block[:, 3:])[0]
        return 0.7 * clip + 0.3 * frame

    expected = fused(queries, videos)
    torch.testing.assert_close(similarity_matrix(queries, videos, SMALL, score_fn=fused)[0], expected)
    assert torch.equal(rank_ground_truth(queries, videos, gt, SMALL, score_fn=fused), gt_ranks(expected, gt))
    with pytest.raises(PipelineError, match="best unit"):
        similarity_matrix(queries, videos, SMALL, score_fn=fused, with_best_unit=True)


def test_top_videos_match_the_full_matrix(data) -> None:
    queries, videos, _ = data
    full, _ = similarity_matrix(queries, videos, LARGE)
    scores, indices = top_videos(queries, videos, 7, SMALL)
    assert torch.equal(indices, full.topk(7, dim=1).indices)
    torch.testing.assert_close(scores, full.topk(7, dim=1).values, rtol=0, atol=1e-6)
    assert top_videos(queries, videos, 1000, SMALL)[1].shape == (40, 60)


def test_bad_shapes_are_reported(data) -> None:
    queries, videos, gt = data
    with pytest.raises(PipelineError, match="query dim 8 differs from video unit dim 6"):
        rank_ground_truth(queries, videos[..., :6], gt, SMALL)
    with pytest.raises(PipelineError, match=r"\[videos, units, dim\]"):
        rank_ground_truth(queries, videos[:, 0], gt, SMALL)
    with pytest.raises(PipelineError, match="0..59"):
        rank_ground_truth(queries, videos, gt + 60, SMALL)
    with pytest.raises(PipelineError, match="nothing to score"):
        rank_ground_truth(queries[:0], videos, gt[:0], SMALL)


class ToyEncoder(nn.Module):
    """A linear 'model': videos are [T, D] feature tensors pooled into 3 units, queries are [D] vectors."""

    unit_windows = torch.tensor([[0.0, 1.0], [0.0, 0.5], [0.5, 1.0]])

    def __init__(self) -> None:
        super().__init__()
        self.video_proj = nn.Linear(6, 4)
        self.text_proj = nn.Linear(6, 4)
        self.text_proj.requires_grad_(False)
        self.dropout = nn.Dropout(0.5)  # must be off during evaluation

    def encode_videos(self, batch: Tensor) -> Tensor:
        half = batch.shape[1] // 2
        units = torch.stack([batch.mean(1), batch[:, :half].mean(1), batch[:, half:].mean(1)], dim=1)
        return self.dropout(self.video_proj(units))

    def encode_queries(self, batch: Tensor) -> Tensor:
        return self.dropout(self.text_proj(batch))


def test_evaluate_encoder_scores_every_part(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    video_features = torch.randn(24, 8, 6, generator=generator)
    gt = torch.arange(30) % 24
    query_features = video_features[gt, :4].mean(1) + 0.3 * torch.randn(30, 6, generator=generator)
    durations = torch.full((24,), 40.0)
    windows = [torch.tensor([[0.0, 20.0]]) if i % 3 else torch.zeros(0, 2) for i in range(30)]
    encoder = ToyEncoder().train()
    assert isinstance(encoder, RetrievalEncoder)
    config = EvalConfig(
        split="val",
        scoring=SMALL,
        efficiency=EfficiencyConfig(corpus_sizes=(50, 200), repeats=2, top_k=10),
    )
    metrics = evaluate_encoder(
        encoder,
        video_features.split(10),
        query_features.split(7),
        gt,
        config,
        durations=durations,
        gt_windows=windows,
    )
    assert encoder.training  # restored after evaluation
    with torch.no_grad():
        encoder.eval()
        scores = max_unit_similarity(encoder.encode_queries(query_features), encoder.encode_videos(video_features))[0]
        encoder.train()
    expected = prvr_metrics(scores, gt)
    assert {k: metrics[k] for k in expected} == expected
    assert (metrics["split"], metrics["num_queries"], metrics["num_videos"]) == ("val", 30, 24)
    assert metrics["moments"]["num_queries"] == 20  # queries without moments are left out
    assert set(metrics["moments"]) == {"num_queries"} | {
        f"{t}-r{k}" for t in (0.1, 0.3, 0.5, 0.7) for k in (1, 10, 100)
    }
    efficiency = metrics["efficiency"]
    assert efficiency["params_total"] == 2 * (6 * 4 + 4) and efficiency["params_trainable"] == 6 * 4 + 4
    assert efficiency["bytes_per_video"] == 3 * 4 * 4
    assert efficiency["query_batch"] == 7
    assert set(efficiency["matching_ms_per_query"]) == {"50", "200"} == set(efficiency["total_ms_per_query"])
    write_metrics(tmp_path / "toy.json", metrics)
    assert json.loads((tmp_path / "toy.json").read_text())["R1"] == pytest.approx(metrics["R1"], rel=1e-5)


def test_evaluate_encoder_takes_plain_objects_and_custom_scores() -> None:
    class Fused:
        def encode_videos(self, batch: Tensor) -> Tensor:
            return batch

        def encode_queries(self, batch: Tensor) -> Tensor:
            return batch

        def score_fn(self, queries: Tensor, videos: Tensor) -> Tensor:
            return max_unit_similarity(queries, videos[:, :2])[0] + 0.5 * max_unit_similarity(queries, videos[:, 2:])[0]

    videos = torch.randn(12, 4, 5)
    queries = torch.randn(9, 5)
    gt = torch.arange(9)
    config = EvalConfig(scoring=SMALL, measure_efficiency=False)
    metrics = evaluate_encoder(Fused(), [videos[:5], videos[5:]], [queries], gt, config)
    assert metrics["R1"] == prvr_metrics(Fused().score_fn(queries, videos), gt)["R1"]
    assert "moments" not in metrics and "efficiency" not in metrics
    with pytest.raises(PipelineError, match="batch #1 gave per-item shape"):
        evaluate_encoder(Fused(), [videos[:5], videos[5:, :3]], [queries], gt, config)
    with pytest.raises(PipelineError, match="no videos to evaluate"):
        evaluate_encoder(Fused(), [], [queries], gt, config)
    with pytest.raises(PipelineError, match="8 ground-truth videos given for 9"):
        evaluate_encoder(Fused(), [videos], [queries], gt[:8], config)


def test_ground_truth_maps_queries_to_corpus_columns() -> None:
    queries = [
        Query("q1", "a", "v2", 10.0, ((1.0, 2.0),), "test"),
        Query("q2", "b", "v1", 10.0, ((0.0, 1.0), (3.0, 4.0)), "test"),
        Query("q3", "c", "v2", 10.0, (), "test"),
    ]
    gt, windows = ground_truth(queries, ["v1", "v2"])
    assert gt.tolist() == [1, 0, 1]
    assert [w.shape for w in windows] == [(1, 2), (2, 2), (0, 2)]
    with pytest.raises(PipelineError, match="'q1' refers to video 'v2', which is not in the evaluated corpus"):
        ground_truth(queries, ["v1"])
