"""Optimiser and learning-rate schedule of the official ProPy code (CLIP4Clip lineage).

AdamW with betas (0.9, 0.98) and eps 1e-6; weight decay on every trainable parameter whose name does not contain
`bias` (prompt tensors included); the learning rate rises linearly from 1e-8 to its peak over the first `warmup`
fraction of all steps, then follows a half cosine from there to the end, floored at 1e-8. The rate is a pure
function of the global step, set before every update, so a resumed run only needs the step.
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
    """AdamW over the trainable parameters: group 0 decays, group 1 (names containing `bias`) does not.

    The official rule is the substring `bias` in the name, nothing else (no exemption for 1-D tensors or prompts).
    The official optimiser also holds two groups of frozen CLIP parameters; they never get a gradient, so AdamW
    skips them and leaving them out changes nothing.

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
            (no_decay if "bias" in name else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


@dataclass(frozen=True)
class WarmupCosine:
    """The official schedule: linear warm-up from `floor` to `peak_lr`, then a half cosine, never below `floor`.

    With S = warmup x total_steps (a float, not rounded) and t the 0-based step: t <= S warms up,
    lr = min(floor + t / S (peak - floor), peak); later steps follow 0.5 peak (1 + cos(pi (t - S) / (T - S))).
    `whole_steps=True` rounds S down to whole steps (not the official rule). `floor=0` ramps from 0 and decays to 0.
    """

    peak_lr: float
    total_steps: int
    warmup: float = 0.1  # fraction of `total_steps` spent warming up
    floor: float = LR_FLOOR  # the warm-up start and the lowest rate (official: 1e-8)
    whole_steps: bool = False  # round the warm-up length down to whole steps (official: False, S = 2.4 stays 2.4)

    @property
    def warmup_steps(self) -> float:
        """S: the length of the linear ramp in steps."""
        steps = self.warmup * self.total_steps
        return float(math.floor(steps)) if self.whole_steps else steps

    def lr(self, step: int) -> float:
        """The learning rate used for the update with 0-based index `step`."""
        ramp, peak = self.warmup_steps, self.peak_lr
        if ramp > 0 and step <= ramp:
            rate = min(self.floor + step / ramp * (peak - self.floor), peak)
        else:
            progress = min(1.0, (step - ramp) / (self.total_steps - ramp)) if self.total_steps > ramp else 1.0
            rate = 0.5 * peak * (1.0 + math.cos(math.pi * progress))
        return max(rate, self.floor)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's learning rate for update `step` and return it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
