"""AMDNet: equivalence with the official code (fixture), official checkpoints, the span-mask fix and training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.config import config_from_dict
from stages.data.errors import PipelineError
from stages.data.schema import Query
from stages.models import build_model
from stages.models.baselines.amdnet import AMDNet, AMDNetConfig
from stages.models.baselines.data import VideoBatch, VideoQueryDataset, collate_train
from stages.models.baselines.importer import import_official, official_state_dict
from stages.models.baselines.layers import gaussian_window
from stages.models.baselines.losses import NegativeSampling
from stages.models.baselines.preprocessing import clip_tensor, query_tokens
from stages.models.baselines.reference import fixture_model_config
from stages.models.reference import TOLERANCE, run_reference_check
from stages.train.baseline_training import BaselineDatasets, BaselineTrainConfig, train_baseline
from stages.train.bert_adam import BertAdam, bert_param_groups
from tests import baseline_features

TINY = AMDNetConfig(
    visual_input_size=12, query_input_size=10, hidden_size=16, n_heads=4, map_size=8, max_ctx_l=16, drop=0.0
)


@pytest.fixture(scope="module")
def prefix(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "baselines_official" / "amdnet_shared")


@pytest.fixture(scope="module")
def official(prefix: str) -> tuple[AMDNetConfig, dict[str, torch.Tensor]]:
    config = json.loads(Path(f"{prefix}_config.json").read_text())
    return fixture_model_config(AMDNetConfig, config), torch.load(f"{prefix}_official_state_dict.pt", weights_only=True)


def tiny_features(
    num_videos: int, seed: int, split: str = "train"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Query]]:
    return baseline_features.tiny_features(num_videos, seed, TINY.visual_input_size, TINY.query_input_size, split)


def tiny_batch(num_videos: int = 6, seed: int = 0, cfg: AMDNetConfig = TINY):
    videos, texts, queries = tiny_features(num_videos, seed)
    dataset = VideoQueryDataset(queries, videos, texts, cfg.preprocess())
    return collate_train([dataset[i] for i in range(len(dataset))])


def test_reference_check_matches_official_code(prefix: str) -> None:
    errors = run_reference_check("amdnet", prefix)
    assert set(errors) == {
        "preprocess_bins",
        "preprocess_inputs",
        "batch_orders",
        "query_encoder",
        "clip_encoder",
        "attention_probs",
        "video_global",
        "span_anchors",
        "span_masks",
        "moments",
        "inference_scores",
        "train_scores",
        "moment_relevance",
        "span_diversity",
        "losses",
        "negatives",
    }
    assert max(errors.values()) <= TOLERANCE
    assert errors["preprocess_inputs"] == 0.0 and errors["batch_orders"] == 0.0 and errors["negatives"] == 0.0
    assert errors["span_masks"] < 2e-5 and errors["inference_scores"] < 1e-6 and errors["losses"] < 1e-6


def test_official_checkpoint_loads_strictly(official: tuple[AMDNetConfig, dict], tmp_path: Path) -> None:
    cfg, state = official
    ours = AMDNet(cfg)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in state.items()]
    container = {"config": {"hidden_size": 64}, "epoch": 3, "model_val": 1.0, "optimizer": {}}
    container["state_dict"] = {f"module.{k}": v for k, v in state.items()}  # saved under DataParallel
    ours.load_state_dict(official_state_dict(container), strict=True)
    path = tmp_path / "model_best.ckpt"
    torch.save(container, path)
    imported = import_official(AMDNet(cfg), path)
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(PipelineError, match="does not fit"):
        import_official(AMDNet(dataclasses.replace(cfg, event_size=1)), path)


def test_parameter_counts_of_the_released_configurations() -> None:
    assert sum(p.numel() for p in AMDNet().parameters()) == 1_781_896  # TVR: D = 384
    assert sum(p.numel() for p in AMDNet(AMDNetConfig(hidden_size=256)).parameters()) == 893_704  # ANet, Charades


def test_inputs_are_float32_clip_means_and_raw_sentence_vectors() -> None:
    pre = TINY.preprocess()
    frames = np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32) * 30
    clips = clip_tensor(frames, pre)
    assert clips.shape == (8, 12) and clips.dtype == np.float32
    np.testing.assert_array_equal(clips[1], (frames[2] + frames[3] + frames[4]) / np.float32(3))  # not normalised
    tokens = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(query_tokens(tokens, pre), tokens[-1:])  # the EOT row, as stored


def test_score_is_the_clip_score_alone_and_a_single_video_works() -> None:
    torch.manual_seed(0)
    batch = tiny_batch()
    model = AMDNet(dataclasses.replace(TINY, clip_scale_w=0.2, frame_scale_w=5.0)).eval()
    with torch.no_grad():
        queries, videos = model.encode_queries(batch.queries), model.encode_videos(batch.videos)
        torch.testing.assert_close(model.score(queries, videos), model.score_branches(queries, videos)["clip"])
        assert videos.shape == (6, TINY.map_size, TINY.hidden_size) and (queries >= 0).all()
        one = VideoBatch(["v"], batch.videos.clip_feats[:1], batch.videos.frame_feats[:1], batch.videos.frame_mask[:1])
        torch.testing.assert_close(model.encode_videos(one)[0], videos[0], atol=1e-6, rtol=0)  # official: crashes


def test_head_h_is_masked_by_span_h() -> None:
    torch.manual_seed(0)
    model = AMDNet(TINY).eval()
    x = torch.randn(2, TINY.map_size, TINY.hidden_size)
    probs = {}
    model.clip_encoder.attn1.self.dropout.register_forward_hook(lambda _m, _i, out: probs.setdefault("p", out))
    with torch.no_grad():
        parts = model.clip_encoder(x)
        attn = model.clip_encoder.attn1.self
        first = model.clip_encoder.attn0(x)
        q, k = attn._heads(attn.query(first)), attn._heads(attn.key(first))
        logits = q @ k.transpose(-1, -2) / (TINY.hidden_size // TINY.n_heads) ** 0.5
    torch.testing.assert_close(probs["p"], torch.softmax(logits * parts.masks[:, :, None, :], dim=-1))
    with pytest.raises(PipelineError, match="event_size"):
        config_from_dict(AMDNetConfig, {"event_size": 3}, "params")
    single = AMDNet(dataclasses.replace(TINY, event_size=1))  # one span mask broadcast over the heads
    assert single.clip_encoder(x).masks.shape == (2, 1, TINY.map_size)


def test_stable_span_masks_fix_removes_the_official_nan() -> None:
    grid = torch.linspace(0, 1, 16)
    centre, width = torch.tensor([[0.5], [0.3]]), torch.tensor([[0.02], [0.4]])
    official = gaussian_window(grid, centre, width)
    fixed = gaussian_window(grid, centre, width, stable=True)
    assert torch.isnan(official[0]).all() and torch.isfinite(fixed).all()  # c between grid points, sigma tiny
    assert fixed[0].max() == 1.0 and fixed[0, 7] == fixed[0, 8] == 1.0  # the two nearest grid points
    torch.testing.assert_close(fixed[1], official[1], atol=1e-6, rtol=0)  # unchanged wherever it is finite

    batch = tiny_batch()
    losses = {}
    for stable in (False, True):
        torch.manual_seed(0)
        model = AMDNet(dataclasses.replace(TINY, stable_span_masks=stable)).eval()
        with torch.no_grad():
            model.clip_encoder.fc_gauss.bias[1::2] = -12.0  # widths ~ 6e-6: every span collapses
            model.clip_encoder.fc_gauss.weight.zero_()
            model.clip_encoder.fc_gauss.bias[0::2] = 0.0323  # centres between grid points
        losses[stable] = model(batch, NegativeSampling())[0]["total"]
    assert torch.isnan(losses[False]) and torch.isfinite(losses[True])


def test_training_step_runs_and_the_loss_falls() -> None:
    torch.manual_seed(0)
    batch = tiny_batch()
    model = AMDNet(TINY)
    losses, negatives = model(batch, NegativeSampling(hard=True), torch.Generator().manual_seed(0))
    assert set(losses) == {"clip_nce", "div", "rel", "total"} and not negatives
    torch.testing.assert_close(losses["total"], losses["clip_nce"] + losses["div"] + losses["rel"])
    losses["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer = BertAdam(bert_param_groups(model, 0.01), lr=3e-3, warmup=-1)
    start = losses["total"].item()
    for _ in range(30):
        optimizer.zero_grad()
        model(batch, NegativeSampling())[0]["total"].backward()
        optimizer.step()
    assert model(batch, NegativeSampling())[0]["total"].item() < 0.7 * start


def test_the_shared_baseline_trainer_trains_it() -> None:
    train_videos, train_texts, train_queries = tiny_features(6, seed=2)
    val_videos, val_texts, val_queries = tiny_features(4, seed=3, split="val")
    datasets = BaselineDatasets.from_annotations(
        train_queries + val_queries, train_videos | val_videos, train_texts | val_texts, TINY.preprocess()
    )
    cfg = BaselineTrainConfig(n_epoch=2, batch_size=3, device="cpu", seed=0)
    result = train_baseline(build_model("amdnet", cfg=TINY), datasets, cfg, progress=False)
    assert len(result.history) == 2 and {"clip_nce", "div", "rel", "total", "SumR"} <= set(result.history[-1])
