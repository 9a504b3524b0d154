"""Optimiser and learning-rate schedule of the official ProPy code (CLIP4Clip lineage).

AdamW with betas (0.9, 0.98) and eps 1e-6; weight decay on every trainable parameter except biases (prompt tensors
included); the learning rate rises linearly from 1e-8 to its peak over the first `warmup` fraction of all steps, then
follows a half cosine, floored at 1e-8. The rate is a pure function of the global step, set before every update, so
a resumed run only needs the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

LR_FLOOR = 1e-8


def build_adamw(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: group 0 decays (non-bias), group 1 does not (biases).

    Args:
        named_parameters: `(name, parameter)` pairs, e.g. `model.named_parameters()`; frozen ones are skipped.
        lr: peak learning rate (the schedule overwrites it every step).
        weight_decay: decoupled weight decay of non-bias parameters.
        betas: Adam moment coefficients.
        eps: Adam epsilon.
    """
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if name.endswith("bias") else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from 1e-8 to `peak_lr`, then a cosine decay to 0, floored at 1e-8 (per optimiser step)."""

    peak_lr: float
    total_steps: int
    warmup: float = 0.1  # fraction of `total_steps` spent warming up

    @property
    def warmup_steps(self) -> int:
        """Steps of the linear ramp."""
        return int(self.warmup * self.total_steps)

    def lr(self, step: int) -> float:
        """The learning rate used for the update with 0-based index `step`."""
        ramp = self.warmup_steps
        if step < ramp:
            return LR_FLOOR + (self.peak_lr - LR_FLOOR) * step / ramp
        progress = (step - ramp) / max(1, self.total_steps - ramp)
        return max(LR_FLOOR, 0.5 * self.peak_lr * (1.0 + math.cos(math.pi * min(1.0, progress))))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's learning rate for update `step` and return it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
