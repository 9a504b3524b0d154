"""The torch device named by a config value."""

from __future__ import annotations

import torch

from stages.data.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:K`, ...; a clear error when CUDA is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PipelineError(f"device {name!r} is not a torch device name (try auto, cpu or cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} asked for but CUDA is not available; use device=cpu or auto")
    return device
