"""GMMFormer: equivalence with the official code (fixtures), Gaussian masks, query-diverse loss, padding dependence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.models.baselines.data import QueryBatch, TrainBatch, VideoBatch
from stages.models.baselines.gmmformer import GMMFormer, GMMFormerConfig, GMMFormerVideos
from stages.models.baselines.layers import gaussian_mask
from stages.models.baselines.losses import NegativeSampling, query_diverse_loss, video_triplet
from stages.models.reference import TOLERANCE, run_reference_check

SMALL = GMMFormerConfig(
    visual_input_size=12, query_input_size=10, hidden_size=16, max_ctx_l=8, max_desc_l=6, map_size=4
)


@pytest.fixture(scope="module")
def prefix(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "baselines_official" / "gmmformer_shared")


def test_reference_check_matches_official_code(prefix: str) -> None:
    errors = run_reference_check("gmmformer", prefix)
    assert set(errors) >= {
        "query_encoder",
        "clip_encoder",
        "frame_encoder",
        "gauss_masks",
        "sub_batch",
        "inference_scores",
        "train_scores",
        "loss_hardest",
        "loss_random",
        "loss_hardpool",
    }
    assert max(errors.values()) <= TOLERANCE
    assert errors["gauss_masks"] < 2e-6 and errors["negatives"] == 0.0 and errors["loss_hardpool"] < 1e-6


def test_state_dict_layout_is_official(prefix: str) -> None:
    official = torch.load(f"{prefix}_official_state_dict.pt", weights_only=True)
    ours = GMMFormer(
        GMMFormerConfig(visual_input_size=48, query_input_size=40, hidden_size=64, max_ctx_l=16, map_size=8)
    )
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in official.items()
    ]
    assert sum(p.numel() for p in GMMFormer().parameters()) == 10_773_120  # official count, CLIP-B/32 inputs


def test_gaussian_mask_quirks() -> None:
    mask = gaussian_mask(8, 0.5)
    assert mask.dtype == torch.float32 and torch.allclose(mask.max(dim=1).values, torch.ones(8))
    assert mask[-1].argmax().item() == 6  # centre i/L against grid j/(L-1): the last row peaks at L-2
    assert mask[0].argmax().item() == 0
    assert torch.allclose(gaussian_mask(8, 1e6), torch.ones(8, 8), atol=1e-6)  # very wide: no effect


def test_query_diverse_loss_reference_value() -> None:
    queries = torch.tensor(np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert query_diverse_loss(queries, labels, 0.15, 32).item() == pytest.approx(5.35458, abs=1e-5)
    single = torch.tensor([0, 1, 2, 3, 4, 5])
    assert query_diverse_loss(queries, single, 0.15, 32).item() == 0.0  # lone queries add log 1


def test_video_triplet_hard_mode_uses_hardest_query_per_video() -> None:
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6]])
    labels = torch.tensor([0, 0, 1])
    terms, negatives = video_triplet(scores, labels, 0.1, NegativeSampling(hard=True, pool_size=20))
    assert negatives["v2t"].tolist() == [2, 1]  # hardest query of another video, whatever the pool size
    assert negatives["t2v"].tolist() == [1, 1, 0]
    expected_v2t = (max(0, 0.1 + 0.3 - 0.85) + max(0, 0.1 + 0.7 - 0.6)) / 2
    assert terms["v2t"].item() == pytest.approx(expected_v2t)


def test_one_video_batch_has_no_triplet_signal() -> None:
    terms, _ = video_triplet(torch.tensor([[0.4], [0.9]]), torch.tensor([0, 0]), 0.1, NegativeSampling())
    assert terms["t2v"].item() == 0.0 and terms["v2t"].item() == 0.0


def test_frame_vector_depends_on_the_padded_batch_length() -> None:
    """Officially the frame Gaussian masks use the padded batch length: frame vectors depend on the video block."""
    torch.manual_seed(0)
    model = GMMFormer(SMALL).eval()
    with torch.no_grad():
        for param in model.parameters():  # weights large enough for the attention logits to matter
            param.normal_(0.0, 0.5)
    frames = torch.randn(2, 8, SMALL.visual_input_size)
    mask = torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5])
    clips = torch.randn(2, SMALL.map_size, SMALL.visual_input_size)
    with torch.no_grad():
        together = GMMFormerVideos.unpack(
            model.encode_videos(VideoBatch(["a", "b"], clips, frames * mask[..., None], mask))
        )
        alone = GMMFormerVideos.unpack(model.encode_videos(VideoBatch(["b"], clips[1:], frames[1:, :3], mask[1:, :3])))
    torch.testing.assert_close(alone.clips[0], together.clips[1], atol=1e-6, rtol=0)
    assert (alone.frame_vec[0] - together.frame_vec[1]).abs().max() > 1e-4


def test_training_step_has_all_terms() -> None:
    torch.manual_seed(0)
    model = GMMFormer(SMALL).train()
    g = torch.Generator().manual_seed(1)
    videos = VideoBatch(
        ["a", "b"], torch.randn(2, 4, 12, generator=g), torch.randn(2, 5, 12, generator=g), torch.ones(2, 5)
    )
    queries = QueryBatch(["1", "2", "3"], torch.randn(3, 6, 10, generator=g), torch.ones(3, 6), torch.tensor([0, 0, 1]))
    loss, parts = model.training_loss(TrainBatch(videos, queries), NegativeSampling(), torch.Generator().manual_seed(0))
    loss.backward()
    assert set(parts) >= {"clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl", "total"}
    assert loss.item() == pytest.approx(
        sum(parts[k].item() for k in ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl"))
    )
    assert all(p.grad is not None for p in model.parameters())


def test_a_mask_first_cached_during_evaluation_serves_training() -> None:
    """Evaluation (inference mode) may meet a sequence length first; training with that length must not crash."""
    with torch.inference_mode():
        gaussian_mask(11, 0.5)
    weights = torch.ones(11, 11, requires_grad=True)
    (weights * gaussian_mask(11, 0.5)).sum().backward()
    torch.testing.assert_close(weights.grad, gaussian_mask(11, 0.5))
