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


def test_schedule_is_the_official_one_with_a_fractional_warmup() -> None:
    """The fixture's schedule: T = 8, S = 0.3 x 8 = 2.4 (not rounded), t <= S warms up, the cosine runs from S."""
    schedule = WarmupCosine(peak_lr=8e-4, total_steps=8, warmup=0.3)
    assert schedule.warmup_steps == pytest.approx(2.4)
    official = [1e-8, 3.333392e-4, 6.666683e-4, 7.775533e-4]  # fixtures README, "Learning-rate schedule"
    assert [schedule.lr(t) for t in range(4)] == pytest.approx(official, rel=1e-6)


def test_whole_steps_option_rounds_the_warmup_down() -> None:
    official = WarmupCosine(peak_lr=8e-4, total_steps=8, warmup=0.3)
    whole = WarmupCosine(peak_lr=8e-4, total_steps=8, warmup=0.3, whole_steps=True)
    assert whole.warmup_steps == 2.0
    assert whole.lr(1) == pytest.approx(1e-8 + (8e-4 - 1e-8) / 2)  # a ramp of 2 steps instead of 2.4
    assert whole.lr(2) == pytest.approx(8e-4) and official.lr(2) < 8e-4  # t = 2 is the cosine's first step
    assert whole.lr(3) == pytest.approx(0.5 * 8e-4 * (1 + math.cos(math.pi / 6)))
    assert [whole.lr(t) for t in range(8)] != pytest.approx([official.lr(t) for t in range(8)])


def test_lr_floor_option_starts_and_ends_the_schedule() -> None:
    floored = WarmupCosine(peak_lr=1e-3, total_steps=10, warmup=0.2)
    plain = WarmupCosine(peak_lr=1e-3, total_steps=10, warmup=0.2, floor=0.0)
    assert floored.lr(0) == LR_FLOOR and plain.lr(0) == 0.0
    assert plain.lr(1) == pytest.approx(0.5e-3) and floored.lr(1) == pytest.approx(LR_FLOOR + (1e-3 - LR_FLOOR) / 2)
    assert plain.lr(10) == pytest.approx(0.0, abs=1e-20) and floored.lr(10) == LR_FLOOR
    assert floored.lr(5) == pytest.approx(plain.lr(5))  # the floor only matters where the rate would go below it


def test_bias_rule_is_the_official_substring_rule() -> None:
    model = nn.Module()
    model.unbiased_prompt = nn.Parameter(torch.zeros(3))  # the substring anywhere in the name exempts it
    model.weight = nn.Parameter(torch.zeros(3))
    decay, no_decay = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.2).param_groups
    assert [id(p) for p in decay["params"]] == [id(model.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(model.unbiased_prompt)]
