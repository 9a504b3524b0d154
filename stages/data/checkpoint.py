"""Checkpoint files: atomic, loadable with `weights_only=True` (the checkpoint data contract).

A checkpoint is a plain dict of tensors and primitive containers (no pickled objects):
`format`, `model` (registry name), `model_config` (the dataclass as a dict, pyramid included), `clip_sha256` (the
frozen CLIP is referenced, not copied), `trainable` (trainable parameters only), `optimizer`, `scaler`, `step`,
`epoch`, `step_in_epoch`, `rng` (python, numpy, torch, cuda), `fingerprint` (what must match to resume) and free
`extra` entries (history, best score, ...). Files are written to a temporary name, fsynced and renamed, so a killed
run leaves either the previous checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from stages.data.errors import PipelineError

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically: temporary file, flush, fsync, rename, fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer (one writer per file)
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (tensors and primitives only, `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist; train first (`python pipeline.py train-propy`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unpickling failure means an unusable file
        raise PipelineError(f"{path} is not a readable checkpoint ({exc}); delete it to start again") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path} is not a checkpoint of format {CHECKPOINT_FORMAT}; delete it to start again")
    return payload
