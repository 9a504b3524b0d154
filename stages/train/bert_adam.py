"""BertAdam and the warm-up-linear schedule, as used by every official MS-SL-family baseline.

Per parameter tensor, at step s (counted from 0) of a nominal horizon t_total:
    g <- clip_grad_norm(g, max_grad_norm)            (per tensor, not global)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2   (no bias correction)
    update = m / (sqrt(v) + eps) + weight_decay * p   (decoupled decay; groups set it to 0 for biases / LayerNorm)
    p <- p - lr * warmup_linear(s / t_total, warmup) * update
`warmup_linear(x, w) = x / w` for x < w, else `max((x - 1) / (w - 1), 0)`: a linear rise over the first w of the
horizon and a linear decay to 0 at t_total (the first step therefore has learning rate 0, as officially).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

NO_DECAY_MARKERS = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def warmup_linear(progress: float, warmup: float = 0.002) -> float:
    """The learning-rate factor at `progress` = step / t_total."""
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0)


def bert_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Official grouping: decay for every trainable tensor except biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(marker in name for marker in NO_DECAY_MARKERS) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class WarmupLinear:
    """BertAdam's schedule as the training loop sees it (`loop.Schedule`): BertAdam applies it itself."""

    peak_lr: float
    total_steps: int
    warmup: float

    def lr(self, step: int) -> float:
        """The learning rate of the update with 0-based index `step`."""
        return self.peak_lr * warmup_linear(step / self.total_steps, self.warmup)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Nothing to set (BertAdam schedules from its own step count); returns the rate."""
        return self.lr(step)


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, per-tensor gradient clipping, decoupled weight decay and warm-up-linear lr.

    Args:
        params: parameters or groups (see `bert_param_groups`).
        lr: peak learning rate.
        warmup: fraction of `t_total` spent warming up (official 0.01); -1 disables the schedule.
        t_total: the nominal number of steps (n_epoch x steps per epoch, not the early-stopped length); -1: constant.
        b1, b2, eps: Adam coefficients.
        weight_decay: default decoupled weight decay.
        max_grad_norm: per-tensor gradient-norm clip (<= 0 disables).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        warmup: float = -1,
        t_total: int = -1,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ) -> None:
        if lr < 0 or not 0 <= b1 < 1 or not 0 <= b2 < 1 or eps < 0:
            raise ValueError(f"invalid BertAdam settings: lr={lr}, b1={b1}, b2={b2}, eps={eps}")
        defaults = {
            "lr": lr,
            "warmup": warmup,
            "t_total": t_total,
            "b1": b1,
            "b2": b2,
            "eps": eps,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
        }
        super().__init__(params, defaults)

    def scheduled_lr(self, group: dict, step: int) -> float:
        """The learning rate of `group` at its parameters' step `step`."""
        if group["t_total"] == -1:
            return group["lr"]
        return group["lr"] * warmup_linear(step / group["t_total"], group["warmup"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(param)
                    state["next_v"] = torch.zeros_like(param)
                if group["max_grad_norm"] > 0:
                    nn.utils.clip_grad_norm_(param, group["max_grad_norm"])
                grad = param.grad
                state["next_m"].mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
                state["next_v"].mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
                update = state["next_m"] / (state["next_v"].sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update = update + group["weight_decay"] * param
                param.add_(update, alpha=-self.scheduled_lr(group, state["step"]))
                state["step"] += 1
        return loss
