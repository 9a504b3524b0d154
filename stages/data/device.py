"""The torch device named by a config value, and the mixed precision used on it."""

from __future__ import annotations

import contextlib

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


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype: None (fp32) on CPU or without AMP, bf16 where the GPU supports it, else fp16."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for `dtype` (a no-op context for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
