"""AdamW parameter groups and the warm-up + cosine schedule of the official ProPy code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stages.train.optim import LR_FLOOR, WarmupCosine, build_adamw


def test_adamw_groups_decay_weights_and_prompts_but_not_biases() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model.prompts = nn.Parameter(torch.zeros(5, 4))
    model[1].requires_grad_(False)
    opt = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.2)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model.prompts)}
    assert [id(p) for p in no_decay["params"]] == [id(model[0].bias)]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    assert decay["betas"] == (0.9, 0.98) and decay["eps"] == 1e-6


def test_adamw_refuses_a_model_without_trainable_parameters() -> None:
    with pytest.raises(ValueError, match="no trainable"):
        build_adamw(nn.Linear(2, 2).requires_grad_(False).named_parameters(), lr=1e-3, weight_decay=0.2)


def test_schedule_warms_up_linearly_then_follows_a_floored_cosine() -> None:
    schedule = WarmupCosine(peak_lr=1e-3, total_steps=100, warmup=0.1)
    assert schedule.warmup_steps == 10
    assert schedule.lr(0) == LR_FLOOR
    assert schedule.lr(5) == pytest.approx(LR_FLOOR + (1e-3 - LR_FLOOR) / 2)
    assert schedule.lr(10) == pytest.approx(1e-3)
    assert schedule.lr(55) == pytest.approx(0.5e-3)
    assert schedule.lr(99) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 89 / 90)))
    assert schedule.lr(100) == LR_FLOOR and schedule.lr(500) == LR_FLOOR
    lrs = [schedule.lr(s) for s in range(100)]
    assert lrs[:11] == sorted(lrs[:11]) and lrs[10:] == sorted(lrs[10:], reverse=True)


def test_schedule_without_warmup_starts_at_the_peak_and_apply_sets_every_group() -> None:
    schedule = WarmupCosine(peak_lr=2e-3, total_steps=10, warmup=0.0)
    opt = build_adamw(nn.Linear(2, 2).named_parameters(), lr=1.0, weight_decay=0.2)
    assert schedule.apply(opt, 0) == pytest.approx(2e-3)
    assert all(g["lr"] == pytest.approx(2e-3) for g in opt.param_groups)
