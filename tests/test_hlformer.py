"""HLFormer: equivalence with the official code (fixture), official checkpoints, the Lorentz maths, named fixes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.errors import PipelineError
from stages.models.baselines.data import QueryBatch, TrainBatch, VideoBatch
from stages.models.baselines.gmmformer2 import GMMFormer2Videos
from stages.models.baselines.hlformer import HLFormer, HLFormerConfig
from stages.models.baselines.hlformer_reference import _derived, _pad_probe_frame_scores
from stages.models.baselines.importer import import_official
from stages.models.baselines.lorentz import HLFormerLorentz, entailment_loss, exp_map0, lift, lorentz_math
from stages.models.baselines.losses import NegativeSampling
from stages.models.baselines.reference import fixture_batches, fixture_model_config, load_fixture
from stages.models.reference import TOLERANCE, run_reference_check
from stages.models.trained import baseline_config

SMALL = HLFormerConfig(
    visual_input_size=12, query_input_size=10, hidden_size=16, max_ctx_l=8, max_desc_l=6, map_size=4, lorentz_dim=23
)


@pytest.fixture(scope="module")
def prefix(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "baselines_official" / "hlformer_shared")


@pytest.fixture(scope="module")
def fixture(prefix: str) -> tuple[dict, dict, dict]:
    return load_fixture(prefix)


def _official_model(fixture: tuple[dict, dict, dict], **fixes: bool) -> HLFormer:
    config, _, state = fixture
    cfg = dataclasses.replace(fixture_model_config(HLFormerConfig, config, derived=_derived), **fixes)
    model = HLFormer(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _encode(model: HLFormer, io: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    videos, queries = fixture_batches(io, 4, 7)
    with torch.no_grad():
        return model.encode_queries(queries), model.encode_videos(videos)


def test_reference_check_matches_official_code(prefix: str) -> None:
    errors = run_reference_check("hlformer", prefix)
    assert set(errors) >= {
        "preprocess_inputs",
        "query_encoder",
        "clip_encoder",
        "clip_lorentz",
        "clip_mixture",
        "frame_encoder",
        "frame_lorentz",
        "frame_mixture",
        "gauss_masks",
        "inference_scores",
        "train_scores",
        "hyperbolic",
        "entailment_probe",
        "loss_fixed_terms",
        "loss_hardest",
        "loss_random",
        "loss_hardpool",
        "negatives",
    }
    assert max(errors.values()) <= TOLERANCE
    assert errors["negatives"] == 0.0 and errors["gauss_masks"] == 0.0 and errors["loss_hardpool"] < 1e-6


def test_official_checkpoint_imports_strictly_and_reproduces_the_scores(
    tmp_path: Path, fixture: tuple[dict, dict, dict]
) -> None:
    config, io, state = fixture
    container = {"config": {}, "epoch": 3, "model_val": 1.0, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(container, tmp_path / "model_best.ckpt")
    model = HLFormer(fixture_model_config(HLFormerConfig, config, derived=_derived))
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in state.items()]
    import_official(model, tmp_path / "model_best.ckpt").eval()
    manifolds = {id(m.k) for m in model.modules() if isinstance(m, HLFormerLorentz)}
    assert len(manifolds) == 1 and model.manifold.k.item() == pytest.approx(config["state_dict"]["manifold_k_value"])
    assert not model.manifold.k.requires_grad  # frozen, one tensor under 41 state-dict names
    queries, videos = _encode(model, io)
    np.testing.assert_allclose(model.score(queries, videos).numpy(), io["infer_fused_scores"], atol=1e-6)


def test_the_stored_curvature_k_enters_the_lorentz_branches(fixture: tuple[dict, dict, dict]) -> None:
    """Real checkpoints have k = 1, which would hide a port that ignores k; the fixture's k is 0.728."""
    model = _official_model(fixture)
    io = fixture[1]
    _, official = _encode(model, io)
    with torch.no_grad():
        model.manifold.k.fill_(1.0)
    _, unit = _encode(model, io)
    assert (GMMFormer2Videos.unpack(official, 32).clips - GMMFormer2Videos.unpack(unit, 32).clips).abs().max() > 0.1


def test_lorentz_maths_against_geoopt() -> None:
    manifold = HLFormerLorentz(k=0.7)
    g = torch.Generator().manual_seed(0)
    tangent = torch.nn.functional.pad(0.5 * torch.randn(5, 6, generator=g), (1, 0))
    points = manifold.expmap0(tangent)
    assert manifold.check_point_on_manifold(points)  # time from geoopt's projection onto <x, x>_L = -k
    other = manifold.expmap0(torch.nn.functional.pad(torch.randn(3, 6, generator=g), (1, 0)))
    pairwise = manifold.inner(None, points[:, None], other[None])
    torch.testing.assert_close(manifold.cinner(points, other), pairwise)
    weights = torch.softmax(torch.randn(2, 5, generator=g), dim=-1)
    mid = manifold.mid_point(points, weights)
    torch.testing.assert_close(manifold.inner(None, mid), -torch.ones(2))  # the unit hyperboloid, whatever k
    unit = HLFormerLorentz(k=1.0)
    torch.testing.assert_close(unit.logmap0(unit.expmap0(tangent)), tangent, atol=1e-5, rtol=1e-5)
    far = torch.nn.functional.pad(torch.full((1, 4), 20.0), (1, 0))  # |u| = 40: the official clamp at 10
    torch.testing.assert_close(unit.expmap0(far)[..., 1:].norm(), torch.sinh(torch.tensor(10.0)))


def test_meru_exponential_map_is_geoopts_with_the_official_clamp() -> None:
    curv = torch.tensor(0.8)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    geoopt_point = lorentz_math.expmap0(torch.nn.functional.pad(x, (1, 0)), k=1 / curv)
    torch.testing.assert_close(exp_map0(x, curv), geoopt_point[..., 1:])
    torch.testing.assert_close(lift(exp_map0(x, curv), curv), geoopt_point)
    far = exp_map0(torch.full((1, 4), 10.0), curv)  # radius sqrt(0.8) * 20 > asinh(2^15): saturated
    torch.testing.assert_close(far.norm(), 2.0**15 / curv.sqrt())


def test_entailment_cone_contains_its_own_ray() -> None:
    g = torch.Generator().manual_seed(3)
    videos = torch.randn(4, 8, generator=g)
    curv = torch.tensor(0.8)
    inside = entailment_loss(videos, 1.5 * videos, curv, 0.1)
    assert inside["loss"].item() == 0.0 and (inside["angle"] < inside["aperture"]).all()
    outside = entailment_loss(videos, -videos, curv, 0.1)
    assert outside["loss"].item() > 1.0


def test_mask_frame_pads_ignores_the_zeroed_rows(fixture: tuple[dict, dict, dict]) -> None:
    """On a context whose real rows all score below 0, only the fix lets videos shorter than 128 rows score < 0."""
    io = fixture[1]
    official, fixed = _official_model(fixture), _official_model(fixture, mask_frame_pads=True)
    queries, videos = _encode(official, io)
    before, after = (_pad_probe_frame_scores(model, io, videos) for model in (official, fixed))
    np.testing.assert_allclose(before.numpy(), io["probe_pad_frame_scores"], atol=1e-6)
    assert (before[:, 2:] == 0).all() and (after[:, 2:] < -0.5).all()  # videos 2 and 3 have 40 and 9 rows
    torch.testing.assert_close(after[:, :2], before[:, :2])
    torch.testing.assert_close(fixed.score(queries, videos), official.score(queries, videos))  # real data: max > 0


def test_masked_weight_token_changes_only_padded_videos(fixture: tuple[dict, dict, dict]) -> None:
    io = fixture[1]
    _, official = _encode(_official_model(fixture), io)
    _, fixed = _encode(_official_model(fixture, masked_weight_token=True), io)
    official, fixed = GMMFormer2Videos.unpack(official, 32).frames, GMMFormer2Videos.unpack(fixed, 32).frames
    torch.testing.assert_close(fixed[:2], official[:2])  # 128 real rows: nothing to mask
    assert (fixed[2:] - official[2:]).abs().max() > 0.1


def test_masked_hyp_pool_changes_only_padded_videos(fixture: tuple[dict, dict, dict]) -> None:
    io = fixture[1]
    embeddings = []
    for fixed in (False, True):
        model = _official_model(fixture, masked_hyp_pool=fixed)
        videos, queries = fixture_batches(io, 4, 7)
        with torch.no_grad():
            scores = model.training_scores(TrainBatch(videos, queries))
            _, mask = model.pad_frames(videos.frame_feats, videos.frame_mask)
            embeddings.append(model.hyperbolic_embeddings(scores["query_vec"], scores["clips"], scores["frames"], mask))
    official, fixed = (e["video"] for e in embeddings)
    np.testing.assert_allclose(official.numpy(), io["hyp_video"], atol=1e-5)
    torch.testing.assert_close(fixed[:2], official[:2])
    assert (fixed[2:] - official[2:]).abs().max() > 1e-2


def test_forward_clamps_its_scale_parameters_in_place() -> None:
    torch.manual_seed(0)
    model = HLFormer(SMALL)
    with torch.no_grad():
        model.curv.fill_(5.0)
        model.textual_alpha.fill_(0.5)
        model.clip_encoder.h_attns[1].self.scale_alpha.fill_(0.3)
    loss, _ = model.training_loss(_toy_batch(), NegativeSampling())
    assert torch.isfinite(loss)
    assert model.curv.item() == pytest.approx(np.log(10.0)) and model.textual_alpha.item() == 0.0
    assert model.clip_encoder.h_attns[1].self.scale_alpha.item() == 0.0


def _toy_batch() -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1.0] * 6, [1.0] * 6, [1.0] * 3 + [0.0] * 3])
    videos = VideoBatch(["a", "b", "c"], torch.randn(3, 4, 12, generator=g), torch.randn(3, 6, 12, generator=g), mask)
    queries = QueryBatch(
        [str(i) for i in range(5)], torch.randn(5, 6, 10, generator=g), torch.ones(5, 6), torch.tensor([0, 0, 1, 2, 2])
    )
    return TrainBatch(videos, queries)


def test_training_step_has_every_term_and_the_loss_falls() -> None:
    torch.manual_seed(0)
    model = HLFormer(SMALL).train()
    batch = _toy_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for step in range(15):
        loss, parts = model.training_loss(batch, NegativeSampling(hard=step > 5), torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert set(parts) >= {"clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl", "pop", "entailment"}
            terms = ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl", "pop")
            assert loss.item() == pytest.approx(sum(parts[k].item() for k in terms))
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
            assert "manifold.k" not in trainable and "curv" in trainable
        optimizer.step()
        totals.append(loss.item())
    assert min(totals[-3:]) < 0.7 * totals[0]


def test_config_errors_name_the_key() -> None:
    with pytest.raises(PipelineError, match="lorentz_dim"):
        baseline_config("hlformer", {"lorentz_dim": 62}, 512)
    with pytest.raises(PipelineError, match="attention_num"):
        baseline_config("hlformer", {"attention_num": 5}, 512)
    with pytest.raises(PipelineError, match="exceed max_ctx_l"):
        HLFormer(SMALL).encode_frames(torch.zeros(1, 9, 12), torch.ones(1, 9))
