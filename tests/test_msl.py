"""MS-SL: equivalence with the official code (fixtures), losses, official checkpoints, evaluation interface."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.errors import PipelineError
from stages.evaluate.evaluator import EvalConfig, evaluate_encoder
from stages.models import build_model
from stages.models.baselines.data import QueryBatch, TrainBatch, VideoBatch
from stages.models.baselines.importer import import_official, load_official_checkpoint, official_state_dict
from stages.models.baselines.losses import (
    NegativeSampling,
    diagonal_nce,
    diagonal_triplet,
    draw_ranks,
    multi_positive_nce,
    select_negatives,
)
from stages.models.baselines.msl import MSSL, MSSLConfig, multi_scale_proposals
from stages.models.reference import TOLERANCE, run_reference_check

SMALL = MSSLConfig(visual_input_size=12, query_input_size=10, hidden_size=16, max_ctx_l=8, max_desc_l=6, map_size=4)


@pytest.fixture(scope="module")
def prefix(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "baselines_official" / "mssl_shared")


def _random_batches(seed: int, frames: list[int], tokens: list[int], cfg: MSSLConfig) -> tuple[VideoBatch, QueryBatch]:
    g = torch.Generator().manual_seed(seed)
    length = max(frames)
    mask = (torch.arange(length)[None] < torch.tensor(frames)[:, None]).float()
    videos = VideoBatch(
        [f"v{i}" for i in range(len(frames))],
        torch.randn(len(frames), cfg.map_size, cfg.visual_input_size, generator=g),
        torch.randn(len(frames), length, cfg.visual_input_size, generator=g) * mask[..., None],
        mask,
    )
    qmask = (torch.arange(max(tokens))[None] < torch.tensor(tokens)[:, None]).float()
    queries = QueryBatch(
        [f"q{i}" for i in range(len(tokens))],
        torch.randn(len(tokens), max(tokens), cfg.query_input_size, generator=g) * qmask[..., None],
        qmask,
        torch.arange(len(tokens)) % len(frames),
    )
    return videos, queries


def test_reference_check_matches_official_code(prefix: str) -> None:
    errors = run_reference_check("msl", prefix)
    assert set(errors) >= {
        "preprocess_inputs",
        "query_encoder",
        "clip_encoder",
        "frame_encoder",
        "frame_attention",
        "inference_scores",
        "train_scores",
        "loss_hardest",
        "loss_random",
        "loss_hardpool",
    }
    assert max(errors.values()) <= TOLERANCE
    assert errors["preprocess_bins"] == errors["batch_orders"] == errors["negatives"] == 0.0
    assert (
        errors["inference_scores"] < 1e-6 and max(errors[f"loss_{m}"] for m in ("hardest", "random", "hardpool")) < 1e-6
    )


def test_state_dict_layout_is_official(prefix: str) -> None:
    official = torch.load(f"{prefix}_official_state_dict.pt", weights_only=True)
    ours = MSSL(MSSLConfig(visual_input_size=48, query_input_size=40, hidden_size=64, max_ctx_l=16, map_size=8))
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in official.items()
    ]
    # the parameter count of the official module for CLIP-B/32 and TVR inputs (docs §2.4)
    assert sum(p.numel() for p in MSSL().parameters()) == 2_777_856
    assert (
        sum(p.numel() for p in MSSL(MSSLConfig(visual_input_size=3072, query_input_size=768)).parameters()) == 4_852_992
    )


def test_nce_reference_values() -> None:
    scores = torch.tensor(np.random.default_rng(0).standard_normal((6, 3)))
    assert multi_positive_nce(scores, torch.tensor([0, 0, 1, 1, 2, 2])).item() == pytest.approx(2.3038298418868655)
    assert diagonal_nce(torch.tensor(np.random.default_rng(1).standard_normal((4, 4)))).item() == pytest.approx(
        1.9915084335742153
    )


def test_negative_ranks_follow_the_sampling_rule() -> None:
    counts = torch.full((2000,), 30)
    assert draw_ranks(counts, None).max() == 29 and draw_ranks(counts, None).min() == 0
    assert draw_ranks(counts, 20).max() == 19
    assert (draw_ranks(counts, 1) == 0).all()
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7]])
    positive = torch.tensor([[True, False, False, False]])
    assert [select_negatives(scores, positive, torch.tensor([r])).item() for r in range(3)] == [3, 2, 1]
    # MS-SL's frame triplet: every off-diagonal entry (same-video queries included) is a candidate
    square = torch.tensor([[1.0, 0.95, 0.2], [0.1, 1.0, 0.3], [0.5, 0.4, 1.0]])
    terms, negatives = diagonal_triplet(square, 0.1, NegativeSampling(hard=True, pool_size=1))
    assert negatives["row"].tolist() == [1, 2, 0] and negatives["col"].tolist() == [2, 0, 1]
    assert terms["row"].item() == pytest.approx(0.05 / 3) and terms["col"].item() == pytest.approx(0.05 / 3)


def test_multi_scale_proposals_order() -> None:
    clips = torch.arange(4.0)[None, :, None]
    spans = multi_scale_proposals(clips).flatten().tolist()
    assert spans == [0, 1, 2, 3, 0.5, 1.5, 2.5, 1, 2, 1.5]


def test_scores_do_not_depend_on_video_blocking() -> None:
    torch.manual_seed(0)
    model = MSSL(SMALL).eval()
    videos, queries = _random_batches(1, [8, 3, 5], [6, 2, 4, 5], SMALL)
    with torch.no_grad():
        q = model.encode_queries(queries)
        whole = model.score(q, model.encode_videos(videos))
        second = VideoBatch(["v1"], videos.clip_feats[1:2], videos.frame_feats[1:2, :3], videos.frame_mask[1:2, :3])
        alone = model.score(q, model.encode_videos(second))
    torch.testing.assert_close(alone[:, 0], whole[:, 1], atol=1e-6, rtol=0)
    assert model.encode_videos(videos).shape == (3, SMALL.map_size * 5 // 2 + 2 * SMALL.max_ctx_l, SMALL.hidden_size)


def test_shared_evaluator_and_a_training_step() -> None:
    torch.manual_seed(0)
    model = build_model("msl", cfg=SMALL)
    videos, queries = _random_batches(2, [8, 3, 5], [6, 2, 4, 5, 3, 6], SMALL)
    metrics = evaluate_encoder(
        model,
        [videos],
        [queries],
        queries.labels,
        EvalConfig(split="val", moment_retrieval=False, measure_efficiency=False),
    )
    assert 0 <= metrics["SumR"] <= 400 and metrics["num_videos"] == 3
    model.train()
    loss, parts = model.training_loss(TrainBatch(videos, queries), NegativeSampling(), torch.Generator().manual_seed(0))
    loss.backward()
    assert set(parts) >= {"clip_nce", "clip_trip", "frame_nce", "frame_trip", "total"}
    assert all(p.grad is not None for p in model.parameters())


def test_official_checkpoint_import(tmp_path: Path, prefix: str) -> None:
    official = torch.load(f"{prefix}_official_state_dict.pt", weights_only=True)
    model = MSSL(MSSLConfig(visual_input_size=48, query_input_size=40, hidden_size=64, max_ctx_l=16, map_size=8))
    gmm_style = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.items()}, "epoch": 3}, gmm_style)
    import_official(model, gmm_style)  # identity key mapping once `module.` is stripped
    for key, value in official.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0)
    assert official_state_dict({"model": official, "epoch": 1}).keys() == official.keys()
    with pytest.raises(PipelineError, match="does not fit"):
        import_official(MSSL(SMALL), gmm_style)


def test_msl_checkpoint_with_easydict_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MS-SL pickles its config as an EasyDict; it is read as a plain dict without easydict installed."""
    module = types.ModuleType("easydict")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    module.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", module)
    config = EasyDict(hidden_size=16)
    config.hidden_size = 16
    path = tmp_path / "model.ckpt"
    torch.save({"model": MSSL(SMALL).state_dict(), "model_cfg": config, "epoch": 7}, path)
    monkeypatch.delitem(sys.modules, "easydict")
    checkpoint = load_official_checkpoint(path)
    assert checkpoint["model_cfg"] == {"hidden_size": 16} and checkpoint["epoch"] == 7
    import_official(MSSL(SMALL), path)


def test_checkpoint_loader_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {}, "hook": os.system}, path)
    with pytest.raises(PipelineError, match="refusing"):
        load_official_checkpoint(path)
