"""GMMFormer v2: equivalence with the official code (fixtures), official state dicts, the frame-pad fix, its losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.errors import PipelineError
from stages.models.baselines.data import QueryBatch, TrainBatch, VideoBatch
from stages.models.baselines.gmmformer2 import DyGMMBlock, GMMFormer2, GMMFormer2Config, GMMFormer2Videos
from stages.models.baselines.importer import official_state_dict
from stages.models.baselines.losses import (
    NegativeSampling,
    clip_assignment,
    clip_assignment_loss,
    focal_query_diverse_loss,
)
from stages.models.baselines.reference import fixture_batches, load_fixture
from stages.models.reference import TOLERANCE, run_reference_check

SHARED = GMMFormer2Config(
    visual_input_size=40, query_input_size=28, hidden_size=36, max_ctx_l=128, max_desc_l=30, map_size=32
)
SMALL = GMMFormer2Config(
    visual_input_size=12, query_input_size=10, hidden_size=16, max_ctx_l=8, max_desc_l=6, map_size=6, n_heads=2
)


@pytest.fixture(scope="module")
def prefix(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "baselines_official" / "gmmformer2_shared")


@pytest.fixture(scope="module")
def official(prefix: str) -> GMMFormer2:
    """Our model with the official state dict, loaded from a DataParallel-style container through the importer."""
    state = torch.load(f"{prefix}_official_state_dict.pt", weights_only=True)
    container = {"config": {}, "epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    model = GMMFormer2(SHARED)
    model.load_state_dict(official_state_dict(container), strict=True)
    return model.eval()


def _toy_batch(cfg: GMMFormer2Config, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    frames = [cfg.max_ctx_l, 5, 3]
    mask = (torch.arange(max(frames))[None] < torch.tensor(frames)[:, None]).float()
    videos = VideoBatch(
        ["a", "b", "c"],
        torch.randn(3, cfg.map_size, cfg.visual_input_size, generator=g),
        torch.randn(3, max(frames), cfg.visual_input_size, generator=g) * mask[..., None],
        mask,
    )
    tokens = torch.randn(5, cfg.max_desc_l, cfg.query_input_size, generator=g)
    queries = QueryBatch(
        [str(i) for i in range(5)], tokens, torch.ones(5, cfg.max_desc_l), torch.tensor([0, 0, 1, 1, 2])
    )
    return TrainBatch(videos, queries)


def test_reference_check_matches_official_code(prefix: str) -> None:
    errors = run_reference_check("gmmformer2", prefix)
    assert set(errors) >= {
        "preprocess_inputs",
        "query_encoder",
        "clip_encoder",
        "frame_encoder",
        "frame_padding",
        "dygmm_mixing",
        "gauss_masks",
        "sub_batch",
        "inference_scores",
        "train_scores",
        "ot_assignment",
        "qdl_unweighted",
        "loss_hardest",
        "loss_random",
        "loss_hardpool",
        "negatives",
    }
    assert max(errors.values()) <= TOLERANCE
    assert errors["preprocess_bins"] == errors["batch_orders"] == errors["negatives"] == errors["frame_padding"] == 0
    assert errors["inference_scores"] < 1e-6 and errors["ot_assignment"] < 1e-6
    assert max(errors[f"loss_{mode}"] for mode in ("hardest", "random", "hardpool")) < 1e-6


def test_state_dict_layout_is_official(prefix: str) -> None:
    official = torch.load(f"{prefix}_official_state_dict.pt", weights_only=True)
    ours = GMMFormer2(SHARED).state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == [(k, tuple(v.shape)) for k, v in official.items()]
    assert sum(p.numel() for p in GMMFormer2().parameters()) == 30_198_304  # official count, d_v = d_t = 512


def test_imported_state_dict_gives_the_official_scores(official: GMMFormer2, prefix: str) -> None:
    _, io, _ = load_fixture(prefix)
    videos, queries = fixture_batches(io, 4, 8)
    with torch.no_grad():
        scores = official.score(official.encode_queries(queries), official.encode_videos(videos))
    np.testing.assert_allclose(scores.numpy(), io["infer_fused_scores"], atol=1e-6, rtol=0)


def test_mask_frame_pads_fix_leaves_out_only_the_zeroed_pads(official: GMMFormer2, prefix: str) -> None:
    """Officially the zeroed pads join the frame max, so S_f >= 0; the fix excludes them."""
    _, io, _ = load_fixture(prefix)
    videos, queries = fixture_batches(io, 4, 8)
    fixed = GMMFormer2(dataclasses.replace(SHARED, mask_frame_pads=True))
    fixed.load_state_dict(official.state_dict())
    fixed.eval()
    with torch.no_grad():
        q = official.encode_queries(queries)
        packed = official.encode_videos(videos)
        ours = official.score_branches(q, packed)["frame"]
        clean = fixed.score_branches(q, fixed.encode_videos(videos))["frame"]
    assert ours.min() >= 0 and ours[0, 2] == 0 and ours[4, 2] == 0  # the official quirk
    assert clean[0, 2] < 0 and clean[4, 2] < 0
    positive = ours > 0
    torch.testing.assert_close(clean[positive], ours[positive], atol=0, rtol=0)
    assert (clean[~positive] < 0).all()
    frames = GMMFormer2Videos.unpack(packed, SHARED.map_size).frames
    assert ((frames == 0).all(dim=-1) == (torch.from_numpy(io["model_frame_mask"]) == 0)).all()


def test_videos_do_not_depend_on_their_block() -> None:
    """Frames are padded to max_ctx_l inside the model, so the Gaussian length never depends on the batch."""
    torch.manual_seed(0)
    model = GMMFormer2(SMALL).eval()
    batch = _toy_batch(SMALL).videos
    with torch.no_grad():
        together = model.encode_videos(batch)
        alone = model.encode_videos(
            VideoBatch(["c"], batch.clip_feats[2:], batch.frame_feats[2:, :3], batch.frame_mask[2:, :3])
        )
    torch.testing.assert_close(alone[0], together[2], atol=1e-6, rtol=0)


def test_lengths_are_checked() -> None:
    model = GMMFormer2(SMALL)
    with pytest.raises(PipelineError, match="exceed max_ctx_l"):
        model.pad_frames(torch.zeros(1, SMALL.max_ctx_l + 1, 12), torch.ones(1, SMALL.max_ctx_l + 1))
    block = DyGMMBlock(16, 2, 0.0, (None, 1.0, 0.1), length=4, sft_factor=0.1)
    with pytest.raises(ValueError, match="built for 4 positions"):
        block(torch.zeros(1, 5, 16), torch.zeros(1, 1, 16))
    with pytest.raises(ValueError, match="too narrow"):  # the official recipe underflows: w = 0.1 needs L > 4
        block(torch.zeros(1, 4, 16), torch.zeros(1, 1, 16))


def test_focal_query_diverse_loss_counts_ordered_pairs() -> None:
    queries = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    cos = 2**-0.5
    pair = (1 + cos) * np.log1p(np.exp(32 * (cos + 0.15)))
    assert focal_query_diverse_loss(queries, labels, 0.15, 32, 1).item() == pytest.approx(2 * pair / 3, rel=1e-6)
    assert focal_query_diverse_loss(queries, torch.tensor([0, 1, 2]), 0.15, 32, 1).item() == 0.0


def test_clip_assignment_is_one_to_one_and_pooled() -> None:
    """Queries 0 and 1 both prefer clip 0: the optimum gives it to query 1 and clip 2 to query 0 (1.995 against 1.994
    the other way); the single query of video 1 is skipped; the mean pools the matched pairs."""
    clips = torch.eye(3)[None].repeat(2, 1, 1)  # 2 videos whose clips are the unit axes
    queries = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cosine, assigned = clip_assignment(queries, clips, torch.tensor([0, 0, 0, 1]))
    assert assigned.tolist() == [2, 0, 1, -1]
    expected = 1 - (0.0 + 1 / np.sqrt(1.01) + 1.0) / 3
    assert clip_assignment_loss(cosine, assigned).item() == pytest.approx(expected, rel=1e-6)
    cosine, assigned = clip_assignment(queries[:2], clips, torch.tensor([0, 1]))
    assert assigned.tolist() == [-1, -1] and clip_assignment_loss(cosine, assigned).item() == 0.0


def test_training_step_and_the_loss_falls() -> None:
    torch.manual_seed(0)
    model = GMMFormer2(SMALL).train()
    batch = _toy_batch(SMALL, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampling = NegativeSampling(hard=True, pool_size=1)
    losses = []
    for _ in range(15):
        loss, parts = model.training_loss(batch, sampling, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(parts) >= {"clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl", "ot", "total"}
    assert loss.item() == pytest.approx(
        sum(parts[k].item() for k in ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl", "ot"))
    )
    assert all(p.grad is not None for p in model.parameters())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
