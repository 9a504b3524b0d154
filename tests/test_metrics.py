"""PRVR metrics: the reference cases A-D of docs/baselines_official_code.md §2.3, the stable tie rule, the
`score-matrix` command and the metrics file writer."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stages.data.errors import PipelineError
from stages.evaluate.evaluator import write_metrics
from stages.evaluate.metrics import (
    BootstrapConfig,
    ground_truth_digest,
    gt_ranks,
    paired_bootstrap,
    prvr_metrics,
    prvr_metrics_from_ranks,
    recall_at_corpus_sizes,
)

REPO = Path(__file__).resolve().parents[1]


def case_a() -> np.ndarray:
    return np.random.default_rng(0).random((200, 50))


def case_b() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((200, 50))


def case_c() -> np.ndarray:
    return np.random.default_rng(1).random((1000, 300))


def case_d() -> np.ndarray:
    rng = np.random.default_rng(0)
    clip = rng.random((200, 50))
    frame = rng.random((200, 50))
    return 0.7 * clip + 0.3 * frame


def gt_of(scores: np.ndarray) -> torch.Tensor:
    """GT column i % Nv, as the reference harness builds it from `vid{i%Nv}#enc#{i//Nv}` ids."""
    return torch.arange(scores.shape[0]) % scores.shape[1]


# (R1, R5, R10, R100, SumR, MedR, MeanR) of the official harness.
REFERENCE = {
    "A": (case_a, (0.5, 13.5, 25.0, 100.0, 139.0, 23.0, 24.285)),
    "A-float32": (lambda: case_a().astype(np.float32), (0.5, 13.5, 25.0, 100.0, 139.0, 23.0, 24.285)),
    "B": (case_b, (1.0, 6.5, 19.0, 100.0, 126.5, 29.0, 27.325)),
    "C": (case_c, (0.3, 1.2, 3.1, 33.5, 38.1, 151.5, 151.401)),
    "D": (case_d, (2.0, 10.0, 22.0, 100.0, 134.0, 24.5, 25.12)),
}


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_reference_cases_exact(case: str) -> None:
    make, expected = REFERENCE[case]
    scores = make()
    metrics = prvr_metrics(torch.from_numpy(scores), gt_of(scores))
    r1, r5, r10, r100, sum_r, med_r, mean_r = expected
    assert (metrics["R1"], metrics["R5"], metrics["R10"], metrics["R100"]) == (r1, r5, r10, r100)
    assert metrics["SumR"] == pytest.approx(sum_r, abs=1e-9)
    assert (metrics["MedR"], metrics["MeanR"]) == (med_r, mean_r)


def test_case_a_ranks_and_case_c_counts() -> None:
    ranks = gt_ranks(torch.from_numpy(case_a()), gt_of(case_a()))
    assert ranks[:20].tolist() == [21, 39, 14, 22, 25, 34, 27, 5, 45, 4, 21, 4, 45, 22, 4, 10, 30, 17, 20, 2]
    assert int(ranks.sum()) == 4857
    ranks_c = gt_ranks(torch.from_numpy(case_c()), gt_of(case_c()))
    assert [int((ranks_c <= k).sum()) for k in (1, 5, 10, 100)] == [3, 12, 31, 335]
    assert int(ranks_c.sum()) == 151401


def test_ties_follow_a_stable_descending_sort() -> None:
    scores = np.round(case_a(), 1)  # case E: many ties
    gt = gt_of(scores)
    ranks = gt_ranks(torch.from_numpy(scores), gt)
    order = np.argsort(-scores, axis=1, kind="stable")
    stable = (order == gt.numpy()[:, None]).argmax(axis=1) + 1
    np.testing.assert_array_equal(ranks.numpy(), stable)
    metrics = prvr_metrics(torch.from_numpy(scores), gt)
    assert [metrics[k] for k in ("R1", "R5", "R10", "R100")] == [2.5, 12.5, 23.0, 100.0]
    assert metrics["SumR"] == pytest.approx(138.0, abs=1e-9)


def test_tie_rule_on_a_hand_made_row() -> None:
    scores = torch.tensor([[0.2, 0.5, 0.5, 0.9, 0.5]] * 3)
    # 0.9 is ahead of everything; among the three 0.5s the lower column comes first
    assert gt_ranks(scores, torch.tensor([1, 2, 4], dtype=torch.int32)).tolist() == [2, 3, 4]


def test_medr_is_the_usual_median_and_sumr_is_unrounded() -> None:
    assert prvr_metrics_from_ranks(torch.tensor([1, 2, 7]))["MedR"] == 2.0
    assert prvr_metrics_from_ranks(torch.tensor([1, 2, 7, 200]))["MedR"] == 4.5
    metrics = prvr_metrics_from_ranks(np.array([1, 6, 11]))  # recalls 33.33.., 33.33.., 66.66.., 100
    assert metrics["SumR"] == pytest.approx(100 / 3 + 100 / 3 + 200 / 3 + 100)


def test_bad_ranks_are_rejected() -> None:
    with pytest.raises(PipelineError, match="zero queries"):
        prvr_metrics_from_ranks(torch.tensor([], dtype=torch.long))
    with pytest.raises(PipelineError, match="1-based"):
        prvr_metrics_from_ranks(torch.tensor([0, 1]))


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("pipeline_cli", REPO / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cli


def test_score_matrix_prints_the_metrics_as_json(cli, tmp_path: Path) -> None:
    np.save(tmp_path / "sims.npy", case_c())
    np.save(tmp_path / "gt.npy", gt_of(case_c()).numpy().astype(np.int32))
    result = CliRunner().invoke(
        cli, ["score-matrix", "--sims", str(tmp_path / "sims.npy"), "--gt", str(tmp_path / "gt.npy")]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert (metrics["R1"], metrics["R100"], metrics["MedR"], metrics["MeanR"]) == (0.3, 33.5, 151.5, 151.401)
    low, high = metrics["ci"]["R100"]  # the intervals are printed too
    assert low < 33.5 < high and high - low < 10


@pytest.mark.parametrize(
    ("sims", "gt", "message"),
    [
        (np.zeros((3, 4)), np.array([0, 1]), "GT has 2 entries but SIMS"),
        (np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]), "GT must hold integer"),
        (np.zeros((3, 4)), np.array([0, 4, 1]), r"GT\[1\] = 4 is not a video column"),
        (np.zeros((3, 4)), np.array([0, -1, 1]), r"GT\[1\] = -1"),
        (np.zeros(4), np.array([0]), "SIMS must be a non-empty"),
        (np.zeros((3, 4), dtype=np.int64), np.array([0, 1, 2]), "SIMS must hold floats"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]), r"non-finite value at \[0, 1\]"),
        (np.zeros((2, 2)), np.zeros((2, 1), dtype=int), "GT must be a 1-D"),
    ],
)
def test_score_matrix_rejects_bad_input_cleanly(cli, tmp_path: Path, sims, gt, message: str) -> None:
    np.save(tmp_path / "sims.npy", sims)
    np.save(tmp_path / "gt.npy", gt)
    result = CliRunner().invoke(
        cli, ["score-matrix", "--sims", str(tmp_path / "sims.npy"), "--gt", str(tmp_path / "gt.npy")]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert re.search(message, result.output), result.output


def test_score_matrix_names_a_missing_or_unreadable_file(cli, tmp_path: Path) -> None:
    (tmp_path / "junk.npy").write_text("not numpy")
    result = CliRunner().invoke(cli, ["score-matrix", "--sims", str(tmp_path / "junk.npy"), "--gt", "missing.npy"])
    assert result.exit_code == 1 and "cannot read SIMS" in result.output
    np.save(tmp_path / "sims.npy", np.zeros((2, 2)))
    result = CliRunner().invoke(cli, ["score-matrix", "--sims", str(tmp_path / "sims.npy"), "--gt", "missing.npy"])
    assert result.exit_code == 1 and "GT file missing.npy does not exist" in result.output


def test_write_metrics_is_sorted_rounded_and_keeps_the_unrounded_sumr(tmp_path: Path) -> None:
    metrics = {"split": "test", **prvr_metrics_from_ranks(torch.tensor([1, 6, 11])), "moments": {"0.5-r1": 1 / 3}}
    metrics["ranks"] = [1, 6, 11]
    path = tmp_path / "metrics" / "synthetic" / "propy.json"
    write_metrics(path, metrics)
    text = path.read_text()
    written = json.loads(text)
    assert list(written) == sorted(written)
    assert written["R1"] == 33.3333 and written["moments"]["0.5-r1"] == 0.333333
    assert written["SumR"] == 233.333  # 100/3 + 100/3 + 200/3 + 100, rounded once
    assert written["split"] == "test"
    assert '"ranks": [1, 6, 11]' in text and '"R1": [' in text  # lists of numbers stay on one line
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(PipelineError, match="NaN"):
        write_metrics(path, {"R1": float("nan")})
    assert json.loads(path.read_text()) == written  # a failed write leaves the previous file intact


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap intervals, paired comparisons, recall against corpus size
# ----------------------------------------------------------------------------------------------------------------


def _ranks_with_hit_rate(rate: float, count: int, seed: int) -> np.ndarray:
    """`count` ranks of which a fraction `rate` (exactly) is 1 and the rest lies in 2..50, shuffled."""
    rng = np.random.default_rng(seed)
    hits = round(rate * count)
    ranks = np.concatenate([np.ones(hits, dtype=np.int64), rng.integers(2, 51, count - hits)])
    return rng.permutation(ranks)


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.6])
def test_bootstrap_interval_of_r1_matches_the_binomial_interval(rate: float) -> None:
    count = 2000
    metrics = prvr_metrics_from_ranks(_ranks_with_hit_rate(rate, count, seed=1))
    assert metrics["R1"] == pytest.approx(100 * rate)
    half_width = 100 * 1.959964 * np.sqrt(rate * (1 - rate) / count)  # normal approximation of Binomial(n, p) / n
    low, high = metrics["ci"]["R1"]
    assert low == pytest.approx(100 * rate - half_width, abs=0.12 * half_width)
    assert high == pytest.approx(100 * rate + half_width, abs=0.12 * half_width)


def test_every_metric_has_an_interval_around_it_and_the_bootstrap_is_seeded() -> None:
    ranks = np.random.default_rng(3).integers(1, 300, 500)
    metrics = prvr_metrics_from_ranks(ranks)
    for key in ("R1", "R5", "R10", "R100", "SumR", "MedR", "MeanR"):
        low, high = metrics["ci"][key]
        assert low <= metrics[key] <= high and low < high, key
    assert prvr_metrics_from_ranks(ranks)["ci"] == metrics["ci"]
    assert prvr_metrics_from_ranks(ranks, BootstrapConfig(seed=1))["ci"] != metrics["ci"]
    narrow = prvr_metrics_from_ranks(ranks, BootstrapConfig(level=0.5))["ci"]["SumR"]
    assert metrics["ci"]["SumR"][0] < narrow[0] < narrow[1] < metrics["ci"]["SumR"][1]
    assert "ci" not in prvr_metrics_from_ranks(ranks, None)
    assert "ci" not in prvr_metrics_from_ranks(ranks, BootstrapConfig(resamples=0))


def test_the_bootstrap_takes_seconds_at_tvr_size() -> None:
    ranks = np.random.default_rng(0).integers(1, 2180, 10895)  # TVR val: 10,895 queries over 2,179 videos
    started = time.perf_counter()
    prvr_metrics_from_ranks(ranks)
    assert time.perf_counter() - started < 30


def _two_models(count: int, improved: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Model A's ranks, and model B's: A's with a fraction `improved` of the queries moved to rank 1."""
    rng = np.random.default_rng(seed)
    ranks_a = rng.integers(1, 120, count)
    ranks_b = ranks_a.copy()
    ranks_b[rng.random(count) < improved] = 1
    return ranks_a, ranks_b


def test_paired_bootstrap_detects_a_planted_difference_that_an_unpaired_one_misses() -> None:
    ranks_a, ranks_b = _two_models(500, improved=0.02, seed=0)
    truth = prvr_metrics_from_ranks(ranks_b, None)["SumR"] - prvr_metrics_from_ranks(ranks_a, None)["SumR"]
    result = paired_bootstrap(ranks_b, ranks_a, BootstrapConfig())
    assert result["delta_SumR"] == pytest.approx(truth) and truth > 0
    low, high = result["ci"]
    assert 0 < low < truth < high and result["excludes_zero"]
    reverse = paired_bootstrap(ranks_a, ranks_b, BootstrapConfig())
    assert reverse["delta_SumR"] == pytest.approx(-truth) and reverse["excludes_zero"]
    # scored on independent resamples, the same two models overlap: the pairing is what finds the difference
    interval_a = prvr_metrics_from_ranks(ranks_a, BootstrapConfig(seed=1))["ci"]["SumR"]
    interval_b = prvr_metrics_from_ranks(ranks_b, BootstrapConfig(seed=2))["ci"]["SumR"]
    assert interval_b[0] < interval_a[1]


def test_paired_bootstrap_rarely_flags_a_null_difference() -> None:
    flagged = []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        skill = rng.integers(1, 60, 300)  # the queries' difficulty, shared by both models
        ranks_a = skill + rng.integers(0, 20, 300)  # two equally good models with their own noise
        ranks_b = skill + rng.integers(0, 20, 300)
        flagged.append(paired_bootstrap(ranks_a, ranks_b, BootstrapConfig(resamples=400))["excludes_zero"])
    assert sum(flagged) <= 10  # a 95 % interval excludes a true zero about 5 times in 100
    identical = paired_bootstrap(skill, skill, BootstrapConfig())
    assert identical == {"delta_SumR": 0.0, "ci": [0.0, 0.0], "excludes_zero": False}


def test_paired_bootstrap_needs_the_same_queries() -> None:
    with pytest.raises(PipelineError, match="same queries"):
        paired_bootstrap(np.ones(3), np.ones(4), BootstrapConfig())


def test_recall_at_corpus_size_is_exact_and_ends_at_the_full_corpus_recall() -> None:
    ranks = np.random.default_rng(0).integers(1, 41, 200)
    full = prvr_metrics_from_ranks(ranks, None)
    curves = recall_at_corpus_sizes(ranks, 40, [1, 5, 20, 40])
    assert curves["size"] == [1, 5, 20, 40]
    assert [curves[f"R{k}"][-1] for k in (1, 5, 10)] == pytest.approx([full["R1"], full["R5"], full["R10"]])
    assert curves["R1"][0] == pytest.approx(100.0) and curves["R5"][1] == pytest.approx(100.0)
    assert curves["R1"] == sorted(curves["R1"], reverse=True)
    # against sampling sub-corpora: query i keeps each of its rank - 1 videos ahead with probability (n-1)/(N-1)
    rng = np.random.default_rng(1)
    trials = 3000
    kept_ahead = np.stack([(rng.permutation(39)[:19][None, :] < (ranks - 1)[:, None]).sum(1) for _ in range(trials)])
    assert curves["R1"][2] == pytest.approx(100 * (kept_ahead == 0).mean(), abs=1.0)
    assert curves["R5"][2] == pytest.approx(100 * (kept_ahead < 5).mean(), abs=1.0)
    with pytest.raises(PipelineError, match="corpus sizes"):
        recall_at_corpus_sizes(ranks, 40, [41])


def test_ground_truth_digest_names_the_queries() -> None:
    gt = torch.tensor([0, 2, 1])
    assert ground_truth_digest(gt, 3) == ground_truth_digest(np.array([0, 2, 1], dtype=np.int32), 3)
    assert ground_truth_digest(gt, 3) != ground_truth_digest(gt, 4)
    assert ground_truth_digest(gt, 3) != ground_truth_digest(torch.tensor([0, 1, 2]), 3)
