"""Weakly supervised moment retrieval: candidates (top units x duration, global top-k), the official IoU, the DiDeMo
floor(n/2) multi-window rule, recall keys, and chunked == unchunked."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from stages.data.errors import PipelineError
from stages.evaluate.moments import (
    MomentConfig,
    MomentPredictions,
    moment_hits,
    moment_recalls,
    predict_moments,
    temporal_iou,
)
from stages.evaluate.retrieval import ScoringConfig

CPU = ScoringConfig(device="cpu")
WINDOWS = torch.tensor([[0.0, 1.0], [0.0, 0.5], [0.5, 1.0]])  # a 2-level pyramid: whole video, two halves


def unit(angle_degrees: float) -> list[float]:
    """A 2-D unit vector whose cosine with [1, 0] is cos(angle)."""
    return [math.cos(math.radians(angle_degrees)), math.sin(math.radians(angle_degrees))]


def test_candidates_are_top_units_times_duration_pooled_over_videos() -> None:
    queries = torch.tensor([[1.0, 0.0]])
    # video 0 (10 s): units at 10, 50, 30 degrees; video 1 (20 s): units at 40, 20, 60 degrees (norms vary)
    units = torch.tensor([[unit(10), unit(50), unit(30)], [unit(40), unit(20), unit(60)]]) * torch.tensor(
        [[[1.0], [2.0], [3.0]], [[0.5], [4.0], [1.0]]]
    )
    config = MomentConfig(events_per_video=2, max_per_query=3)
    predictions = predict_moments(queries, units, WINDOWS, torch.tensor([10.0, 20.0]), config, CPU)
    # per video the best 2 units: v0 {10 deg: [0,10], 30 deg: [5,10]}, v1 {20 deg: [0,10], 40 deg: [0,20]};
    # pooled and cut to 3: 10 (v0), 20 (v1), 30 (v0)
    assert predictions.video.tolist() == [[0, 1, 0]]
    assert predictions.start.tolist() == [[0.0, 0.0, 5.0]]
    assert predictions.end.tolist() == [[10.0, 10.0, 10.0]]
    expected = [math.cos(math.radians(a)) for a in (10, 20, 30)]
    torch.testing.assert_close(predictions.score, torch.tensor([expected]))
    # every candidate is kept when fewer than max_per_query exist; events_per_video is capped at K
    everything = predict_moments(queries, units, WINDOWS, torch.tensor([10.0, 20.0]), MomentConfig(), CPU)
    assert everything.video.shape == (1, 6)
    assert everything.score[0].tolist() == sorted(everything.score[0].tolist(), reverse=True)


def test_official_iou_is_intersection_over_the_covering_span() -> None:
    starts = torch.tensor([0.0, 0.0, 2.0, 0.0, 3.0])
    ends = torch.tensor([10.0, 10.0, 4.0, 2.0, 3.0])
    gt_starts = torch.tensor([5.0, 10.0, 0.0, 5.0, 3.0])
    gt_ends = torch.tensor([15.0, 20.0, 10.0, 8.0, 3.0])
    iou = temporal_iou(starts, ends, gt_starts, gt_ends)
    torch.testing.assert_close(iou, torch.tensor([5 / 15, 0.0, 0.2, 0.0, 0.0]))


def predictions_of(rows: list[list[tuple[int, float, float]]]) -> MomentPredictions:
    video = torch.tensor([[v for v, _, _ in row] for row in rows])
    start = torch.tensor([[s for _, s, _ in row] for row in rows])
    end = torch.tensor([[e for _, _, e in row] for row in rows])
    return MomentPredictions(video, start, end, -torch.arange(video.shape[1]).float().expand_as(start))


def test_multi_window_rule_needs_floor_half_of_the_windows() -> None:
    good, bad = [0.0, 10.0], [30.0, 40.0]  # IoU 1 and 0 with the prediction [0, 10]
    gt_windows = [
        torch.tensor([good]),  # n = 1: use it
        torch.tensor([bad]),  # n = 1, missed
        torch.tensor([good, bad]),  # n = 2: 1 needed
        torch.tensor([good, bad, bad]),  # n = 3: 1 needed
        torch.tensor([good, bad, bad, bad]),  # n = 4: 2 needed, 1 matched
        torch.tensor([good, good, bad, bad]),  # n = 4: 2 matched
        torch.tensor([good, bad, bad, bad, bad]),  # n = 5: 2 needed
    ]
    predictions = predictions_of([[(0, 0.0, 10.0)]] * len(gt_windows))
    hits = moment_hits(predictions, torch.zeros(len(gt_windows), dtype=torch.long), gt_windows, 0.5, 100)
    assert hits[:, 0].tolist() == [True, False, True, True, False, True, False]


def test_hits_need_the_right_video_and_count_within_k() -> None:
    gt_windows = [torch.tensor([[0.0, 10.0]]), torch.tensor([[0.0, 10.0]])]
    predictions = predictions_of(
        [
            [(1, 0.0, 10.0), (0, 0.0, 8.0), (0, 0.0, 10.0)],  # right window in the wrong video first
            [(0, 0.0, 6.0), (0, 20.0, 30.0), (0, 0.0, 4.0)],  # IoU 0.6 at rank 1
        ]
    )
    config = MomentConfig(iou_thresholds=(0.5, 0.7), recall_ks=(1, 2, 3), max_scored=3)
    recalls = moment_recalls(predictions, torch.tensor([0, 0]), gt_windows, config)
    assert recalls == {
        "0.5-r1": 50.0,
        "0.5-r2": 100.0,
        "0.5-r3": 100.0,
        "0.7-r1": 0.0,
        "0.7-r2": 50.0,
        "0.7-r3": 50.0,
    }
    only_first = moment_recalls(predictions, torch.tensor([0, 0]), gt_windows, MomentConfig(max_scored=1))
    assert only_first["0.5-r10"] == 50.0 and only_first["0.7-r100"] == 0.0  # later predictions are not scored


def reference_predictions(
    queries: Tensor, units: Tensor, windows: Tensor, durations: Tensor, config: MomentConfig
) -> list[list[tuple[int, float, float, float]]]:
    """A per-pair loop re-statement of the official candidate generation."""
    out = []
    for query in queries:
        candidates = []
        for v, video in enumerate(units):
            cosine = torch.nn.functional.cosine_similarity(query.expand_as(video), video, dim=-1)
            values, indices = cosine.topk(min(config.events_per_video, len(cosine)))
            for value, index in zip(values.tolist(), indices.tolist(), strict=True):
                start, end = (windows[index] * durations[v]).tolist()
                candidates.append((v, start, end, value))
        candidates.sort(key=lambda c: -c[3])
        out.append(candidates[: config.max_per_query])
    return out


def test_vectorised_chunked_candidates_match_a_loop_and_each_other() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(6, 8, generator=generator)
    units = torch.randn(40, 5, 8, generator=generator)
    windows = torch.sort(torch.rand(5, 2, generator=generator), dim=1).values
    durations = 10 + 50 * torch.rand(40, generator=generator)
    config = MomentConfig(events_per_video=3, max_per_query=50)
    chunked = predict_moments(queries, units, windows, durations, config, ScoringConfig(0.01, device="cpu"))
    whole = predict_moments(queries, units, windows, durations, config, CPU)
    for field in ("video", "start", "end"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field))
    torch.testing.assert_close(chunked.score, whole.score)
    for q, expected in enumerate(reference_predictions(queries, units, windows, durations, config)):
        assert chunked.video[q].tolist() == [c[0] for c in expected]
        torch.testing.assert_close(chunked.start[q], torch.tensor([c[1] for c in expected]))
        torch.testing.assert_close(chunked.end[q], torch.tensor([c[2] for c in expected]))


def test_recalls_match_a_loop_on_random_predictions() -> None:
    generator = torch.Generator().manual_seed(3)
    num_queries, num_predictions = 20, 120
    video = torch.randint(0, 3, (num_queries, num_predictions), generator=generator)
    start = 30 * torch.rand(num_queries, num_predictions, generator=generator)
    end = start + 1 + 20 * torch.rand(num_queries, num_predictions, generator=generator)
    predictions = MomentPredictions(video, start, end, torch.zeros_like(start))
    gt_video = torch.randint(0, 3, (num_queries,), generator=generator)
    gt_windows = []
    for q in range(num_queries):
        count = 1 + q % 4
        begin = 30 * torch.rand(count, generator=generator)
        gt_windows.append(torch.stack([begin, begin + 2 + 15 * torch.rand(count, generator=generator)], dim=1))
    config = MomentConfig()
    recalls = moment_recalls(predictions, gt_video, gt_windows, config)
    for threshold in config.iou_thresholds:
        for k in config.recall_ks:
            found = 0
            for q in range(num_queries):
                windows = gt_windows[q].double().tolist()
                needed = 1 if len(windows) == 1 else len(windows) // 2
                for p in range(min(k, config.max_scored)):
                    if int(video[q, p]) != int(gt_video[q]):
                        continue
                    s, e = float(start[q, p]), float(end[q, p])
                    matched = sum(
                        (min(e, ge) - max(s, gs)) / (max(e, ge) - min(s, gs)) >= threshold for gs, ge in windows
                    )
                    if matched >= needed:
                        found += 1
                        break
            assert recalls[f"{threshold}-r{k}"] == pytest.approx(100.0 * found / num_queries)


def test_bad_moment_inputs_are_reported() -> None:
    queries, units = torch.randn(2, 4), torch.randn(3, 3, 4)
    durations = torch.tensor([5.0, 6.0, 7.0])
    with pytest.raises(PipelineError, match=r"unit windows must be \[3, 2\]"):
        predict_moments(queries, units, WINDOWS[:2], durations, MomentConfig(), CPU)
    with pytest.raises(PipelineError, match="0 <= start < end <= 1"):
        predict_moments(queries, units, WINDOWS * 2, durations, MomentConfig(), CPU)
    with pytest.raises(PipelineError, match="2 durations for 3 videos"):
        predict_moments(queries, units, WINDOWS, durations[:2], MomentConfig(), CPU)
    with pytest.raises(PipelineError, match="video #1 has a non-positive duration"):
        predict_moments(queries, units, WINDOWS, torch.tensor([5.0, 0.0, 7.0]), MomentConfig(), CPU)
    predictions = predict_moments(queries, units, WINDOWS, durations, MomentConfig(), CPU)
    with pytest.raises(PipelineError, match="query #1 .* has no ground-truth moment"):
        moment_recalls(
            predictions, torch.tensor([0, 1]), [torch.tensor([[0.0, 1.0]]), torch.zeros(0, 2)], MomentConfig()
        )


class _Units:
    """An encoder of fixed random units (3 per video, the WINDOWS pyramid) and query vectors."""

    unit_windows = WINDOWS

    def __init__(self, videos: Tensor, queries: Tensor) -> None:
        self.videos, self.queries = videos, queries

    def encode_videos(self, rows: slice) -> Tensor:
        return self.videos[rows]

    def encode_queries(self, rows: slice) -> Tensor:
        return self.queries[rows]


def test_evaluation_scores_moments_chunk_by_chunk_of_queries_as_all_at_once() -> None:
    from stages.evaluate.evaluator import EvalConfig, evaluate_encoder

    generator = torch.Generator().manual_seed(5)
    encoder = _Units(torch.randn(30, 3, 8, generator=generator), torch.randn(25, 8, generator=generator))
    gt_video = torch.randint(0, 30, (25,), generator=generator)
    durations = 10 + 20 * torch.rand(30, generator=generator)
    starts = 10 * torch.rand(25, generator=generator)
    gt_windows = [torch.tensor([[float(s), float(s) + 5.0]]) for s in starts]
    results = []
    for budget in (512.0, 0.5):  # 0.5 MB: two queries' predictions per chunk
        config = EvalConfig(scoring=ScoringConfig(budget, device="cpu"), measure_efficiency=False)
        videos, queries = [slice(i, i + 7) for i in range(0, 30, 7)], [slice(i, i + 10) for i in range(0, 25, 10)]
        results.append(evaluate_encoder(encoder, videos, queries, gt_video, config, durations, gt_windows))
    assert results[0]["moments"] == results[1]["moments"] and results[0]["moments"]["num_queries"] == 25
    assert any(value > 0 for key, value in results[0]["moments"].items() if key.endswith("r100"))
