"""Where trained models live and how to load them: what training, evaluation and search share.

propy_dir(base)          cache/<dataset>/propy: last.pt (resume) and best.pt (the selected model)
baseline_dir(base, name) cache/<dataset>/baselines/<name>: model.safetensors and training.json
(under cache/<dataset>/<run>/ for a named run such as `seeds/seed43`)

A model can also be loaded from any path in these layouts (`load_trained_propy(..., checkpoint=PATH)`,
`load_baseline(DIR)`), e.g. an official checkpoint converted by `import-checkpoint` (`propy_import` for ProPy's
single .pt file, `imported` for a baseline's directory, which also checks such files against their fixtures).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP
from safetensors.torch import load_file, save_file
from torch import nn

from stages.data.checkpoint import load_checkpoint
from stages.data.config import BaseConfig, config_from_dict
from stages.data.device import autocast
from stages.data.errors import PipelineError
from stages.data.files import atomic_write_text
from stages.data.rng import seed_everything
from stages.models.baselines.base import BaselineConfig
from stages.models.clip_backbone import ClipArch, load_clip, normalize_frames, tokenize
from stages.models.propy import ProPy, ProPyConfig
from stages.models.propy_import import propy_from_payload
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


def save_baseline(directory: str | Path, state_dict: Mapping[str, torch.Tensor], record: dict[str, Any]) -> Path:
    """Write a baseline in the layout `load_baseline` reads: `model.safetensors` and `training.json` (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.safetensors.tmp"
    # own copies: safetensors refuses tensors that share memory (HLFormer's manifolds share one curvature `k`)
    save_file({k: v.detach().cpu().clone() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, directory / "model.safetensors")
    atomic_write_text(directory / "training.json", json.dumps(record, indent=2, sort_keys=True))
    return directory


def load_baseline(directory: str | Path, name: str | None = None) -> tuple[nn.Module, BaselineConfig, dict[str, Any]]:
    """The baseline saved in `directory` (trained or imported): model (eval mode), its config, its record.

    With `name`, the directory must hold that model.
    """
    directory = Path(directory)
    record_path, weights = directory / "training.json", directory / "model.safetensors"
    if not weights.is_file() or not record_path.is_file():
        raise PipelineError(
            f"{directory} holds no trained model (model.safetensors and training.json); run `python pipeline.py "
            f"train-baseline {name or directory.name}` or `import-checkpoint SRC DIR --model {name or directory.name}`"
        )
    try:
        record = json.loads(record_path.read_text())
        stored = record["model"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{record_path} is not a training record: {exc}") from exc
    if name is not None and stored != name:
        raise PipelineError(f"{directory} holds model {stored!r}, not {name!r}")
    config = config_from_dict(model_spec(stored).config, record["model_config"], str(record_path))
    model = build_model(stored, cfg=config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # noqa: BLE001 - unreadable or mismatching weights: one clear message
        raise PipelineError(f"{weights} does not hold the weights of {stored} with its recorded config: {exc}") from exc
    return model.eval(), config, record


def baseline_selection(record: dict[str, Any]) -> dict[str, Any]:
    """How a saved baseline was chosen: its selection split and epoch, or where it was imported from."""
    if "imported_from" in record:
        return {"split": "", "rule": f"imported from {record['imported_from']}"}
    return {"split": record["select_split"], "best_epoch": record["best_epoch"], "rule": "best SumR"}


def load_trained_baseline(directory: Path, expected: BaselineConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The trained baseline saved in `directory` and how it was selected; it must have the `expected` config."""
    model, config, record = load_baseline(directory)
    if config != expected:
        raise PipelineError(
            f"{directory} was trained with another model config; re-run train-baseline {record['model']}"
        )
    return model, baseline_selection(record)


def build_propy(
    base: BaseConfig, config: ProPyConfig, device: torch.device, clip: tuple[CLIP, ClipArch] | None = None
) -> ProPy:
    """ProPy on the frozen CLIP of `base.clip_weights` (or the given `(clip, arch)`), its trainable parameters drawn
    from `base.seed`.

    Training and the untrained reference call this, so both start from the same parameters.
    """
    clip, arch = clip or load_clip(base.clip_weights)
    seed_everything(base.seed)
    model = build_model("propy", clip=clip, arch=arch, config=config)
    return model.to(device)


def load_trained_propy(
    base: BaseConfig, device: torch.device, checkpoint: str | Path | None = None
) -> tuple[ProPy, dict[str, Any]]:
    """ProPy on its frozen CLIP and how it was selected: the trained `cache/<dataset>/propy/best.pt`, or
    `checkpoint` (e.g. written by `import-checkpoint`).

    The CLIP is the weights file the checkpoint records (an import records the one it wrote or checked) when it
    exists, else `base.clip_weights`; its sha256 must be the checkpoint's.
    """
    path = Path(checkpoint) if checkpoint is not None else propy_dir(base) / "best.pt"
    state = load_checkpoint(path)
    recorded = state.get("clip_weights")
    clip = recorded if recorded and Path(recorded).is_file() else base.clip_weights
    model = propy_from_payload(state, path, clip).to(device)
    imported = state.get("extra", {}).get("imported_from", path)
    return model, state.get("selection", {"split": "", "rule": f"imported from {imported}"})


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
