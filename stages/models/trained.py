"""Where trained models live and how to load them: what training, evaluation and search share.

propy_dir(base)          cache/<dataset>/propy: last.pt (resume) and best.pt (the selected model)
baseline_dir(base, name) cache/<dataset>/baselines/<name>: model.safetensors and training.json
(under cache/<dataset>/<run>/ for a named run such as `seeds/seed43`)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from stages.data.checkpoint import load_checkpoint
from stages.data.config import BaseConfig, config_from_dict
from stages.data.device import autocast
from stages.data.errors import PipelineError
from stages.data.rng import seed_everything
from stages.models.baselines.base import BaselineConfig
from stages.models.clip_backbone import load_clip, normalize_frames, tokenize
from stages.models.propy import ProPy, ProPyConfig
from stages.models.propy_import import load_propy
from stages.models.registry import build_model, model_spec


def propy_dir(base: BaseConfig) -> Path:
    """`cache/<dataset>/propy`: ProPy's training checkpoints (a DVC output)."""
    return base.run_cache / "propy"


def baseline_dir(base: BaseConfig, name: str) -> Path:
    """`cache/<dataset>/baselines/<name>`: weights, resolved configs, history."""
    return base.run_cache / "baselines" / name


def baseline_config(name: str, keys: Mapping[str, Any], feature_dim: int) -> BaselineConfig:
    """The typed model config of baseline `name` from its params keys, with the feature store's input sizes."""
    spec = model_spec(name)
    if spec.config is None or spec.inputs != "features":
        raise PipelineError(f"{name!r} is not a trainable feature baseline")
    config = config_from_dict(spec.config, dict(keys), f"baselines.{name}.model")
    return dataclasses.replace(config, visual_input_size=feature_dim, query_input_size=feature_dim)


def load_trained_baseline(directory: Path, expected: BaselineConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The trained baseline saved in `directory` and how it was selected; it must have the `expected` config."""
    record_path = directory / "training.json"
    if not (directory / "model.safetensors").is_file() or not record_path.is_file():
        raise PipelineError(
            f"{directory} holds no trained model; run `python pipeline.py train-baseline {directory.name}`"
        )
    record = json.loads(record_path.read_text())
    name = record["model"]
    config = config_from_dict(model_spec(name).config, record["model_config"], str(record_path))
    if config != expected:
        raise PipelineError(f"{directory} was trained with another model config; re-run train-baseline {name}")
    model = build_model(name, cfg=config)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    selection = {"split": record["select_split"], "best_epoch": record["best_epoch"], "rule": "best SumR"}
    return model.eval(), selection


def build_propy(base: BaseConfig, config: ProPyConfig, device: torch.device) -> ProPy:
    """ProPy on the frozen CLIP of `base.clip_weights`, its trainable parameters drawn from `base.seed`.

    Training and the untrained reference call this, so both start from the same parameters.
    """
    clip, arch = load_clip(base.clip_weights)
    seed_everything(base.seed)
    model = build_model("propy", clip=clip, arch=arch, config=config)
    return model.to(device)


def load_trained_propy(base: BaseConfig, device: torch.device) -> tuple[ProPy, dict[str, Any]]:
    """The selected model of `cache/<dataset>/propy/best.pt` on its frozen CLIP, and how it was selected.

    An imported official checkpoint (`python pipeline.py import-checkpoint`) copied there works too.
    """
    path = propy_dir(base) / "best.pt"
    state = load_checkpoint(path)
    model = load_propy(path, base.clip_weights).to(device)
    return model, state.get("selection", {"split": "", "rule": f"imported: {state.get('extra', {})}"})


class PropyEncoder:
    """ProPy behind the evaluation protocol: batches of uint8 frames and of caption strings in, embeddings out."""

    def __init__(self, model: ProPy, device: torch.device, dtype: torch.dtype | None, max_words: int) -> None:
        self.model, self.device, self.dtype, self.max_words = model, device, dtype, max_words
        self.unit_windows = model.proposals.cpu()

    def encode_videos(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """uint8 frames [b, Nf, S, S, 3] (and their indices) -> event features [b, Ne, E]."""
        frames = normalize_frames(batch[0].to(self.device, non_blocking=True))
        with autocast(self.device, self.dtype):
            return self.model.encode_videos(frames).float()

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        """Caption strings -> query features [q, E]."""
        ids = tokenize(texts, self.max_words).to(self.device)
        with autocast(self.device, self.dtype):
            return self.model.encode_queries(ids).float()
