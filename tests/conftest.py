"""Shared test setup: offline hubs, small thread counts, the shared fixtures folder and a tiny CLIP weights file."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tests use tiny models: one intra-op thread is faster and reproducible

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`../shared/fixtures` beside the repository (CI and development machines have it)."""
    path = Path(os.environ.get("PRVR_FIXTURES", REPO.parent / "shared" / "fixtures"))
    if not path.is_dir():
        pytest.skip(f"reference fixtures not found at {path} (set PRVR_FIXTURES)")
    return path


@pytest.fixture(scope="session")
def tiny_clip_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny CLIP (64 px, patch 32, width 128/64, 2 layers) saved as safetensors."""
    from stages.models.clip_backbone import ClipArch, save_clip

    torch.manual_seed(0)
    arch = ClipArch(
        embed_dim=48, vision_width=128, vision_layers=2, patch_size=32, image_size=64, text_width=64, text_layers=2
    )
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_clip(arch.build(), path)
    return path
