"""The tiny synthetic CLIP: it learns, it is written in the format `load_clip` reads, its recall is right."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.config import BaseConfig, config_from_dict
from stages.data.errors import PipelineError
from stages.models.clip_backbone import ClipArch, file_sha256, load_clip
from stages.synthetic.pretrain_clip import (
    PretrainClipConfig,
    evaluate_recall,
    render_stills,
    run_pretrain_clip,
    text_to_frame_recall,
    train_clip,
)

MICRO = ClipArch(
    embed_dim=32,
    vision_width=64,
    vision_layers=1,
    patch_size=16,
    image_size=32,
    text_width=64,
    text_layers=1,
    context_length=32,
)


def _config(tmp_path: Path, **changes: object) -> PretrainClipConfig:
    cfg = PretrainClipConfig(
        arch=MICRO,
        output=str(tmp_path / "clip.safetensors"),
        metrics=str(tmp_path / "metrics.json"),
        steps=4,
        batch_size=16,
        eval_frames=24,
        lr=2e-3,
    )
    return replace(cfg, **changes)


def test_writes_weights_that_load_clip_reads(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    metrics = run_pretrain_clip(BaseConfig(seed=1), cfg)
    model, arch = load_clip(cfg.output)
    assert arch == MICRO
    report = json.loads(Path(cfg.metrics).read_text())
    assert report["text_to_frame"] == metrics
    assert report["weights_sha256"] == file_sha256(cfg.output)
    assert metrics["R1_chance"] == pytest.approx(100 / 24)
    # The loaded model scores exactly what the trained one scored.
    frames, texts = render_stills(np.random.default_rng([1 + cfg.seed_offset, 1]), 24, MICRO.image_size, cfg)
    assert evaluate_recall(model, frames, texts) == metrics
    # Same seed, same weights.
    again = _config(tmp_path / "again")
    run_pretrain_clip(BaseConfig(seed=1), again)
    assert file_sha256(again.output) == file_sha256(cfg.output)


def test_loss_decreases(tmp_path: Path) -> None:
    _, losses = train_clip(_config(tmp_path, steps=20), seed=0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2


def test_recall_of_known_similarities() -> None:
    perfect = text_to_frame_recall(torch.eye(10))
    assert (perfect["R1"], perfect["R5"], perfect["MedR"]) == (100.0, 100.0, 1.0)
    # Text i prefers frame i+1 and ranks its own frame second; the last text is right.
    shifted = torch.eye(10) * 0.5 + torch.roll(torch.eye(10), 1, dims=1)
    shifted[9] = torch.eye(10)[9]
    recall = text_to_frame_recall(shifted)
    assert recall["R1"] == pytest.approx(10.0) and recall["R5"] == 100.0
    assert recall["R1_chance"] == pytest.approx(10.0) and recall["R10_chance"] == 100.0


def test_still_frames_match_their_descriptions() -> None:
    frames, texts = render_stills(np.random.default_rng(0), 6, 64, PretrainClipConfig())
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8
    assert all(text.startswith("a ") for text in texts)
    again, _ = render_stills(np.random.default_rng(0), 6, 64, PretrainClipConfig())
    assert np.array_equal(frames, again)


def test_bad_config_is_a_pipeline_error() -> None:
    with pytest.raises(PipelineError, match="objects"):
        config_from_dict(PretrainClipConfig, {"objects": [3, 1]}, "params.yaml:pretrain_clip")
    with pytest.raises(PipelineError, match="unknown"):
        config_from_dict(PretrainClipConfig, {"arch": {"widht": 3}}, "params.yaml:pretrain_clip")
