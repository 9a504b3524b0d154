"""Our ProPy training loop against steps of the official one (`verify-reference propy-train PREFIX`).

    python pipeline.py verify-reference propy-train $PRVR_FIXTURES/propy_official/train_cfg32

The fixture (`PREFIX_config.json`, `PREFIX_steps.npz`; format in the fixtures folder's `propy_official/README.md`)
holds K optimisation steps of the official `main_prvr.py` from a checkpoint, on fixed batches. This check runs
what `train-propy` runs, not a copy: `build_trainer` (AdamW groups, warm-up/cosine schedule, global-norm clipping
inside `Trainer.step`) and `PropyStep` (forward, official loss, logit-scale clamp), on the fast and (`faithful_*`)
the official-computation path, in float32 on the CPU. Errors are relative, max|ours - official| / max|official|
per tensor (absolute where the official tensor is all zeros, e.g. the dead `postfix_proj`), the largest over
tensors and steps: learning rates and weight decays of the two trainable groups (the official frozen-CLIP groups
never step), losses and logits, the global gradient norm, the clipping factor, the clipped gradients, the
trainable state after every step, AdamW's moments and step counts after the last step, and the frozen CLIP (which
must not move).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.data.errors import PipelineError
from stages.models.propy import ProPy
from stages.models.propy_import import build_from_official, load_official_state, official_name
from stages.models.pyramid import PyramidConfig
from stages.models.reference import register_reference_check
from stages.train.optim import build_adamw
from stages.train.train_propy import LOGIT_SCALE_RANGE, PropyStep, TrainPropyConfig, build_trainer

TRAIN_TOLERANCE = 1e-5  # relative


def relative_error(ours: torch.Tensor | float, official: torch.Tensor | np.ndarray | float) -> float:
    """max|ours - official| / max|official| (absolute when the official value is all zeros)."""
    ours_t = torch.as_tensor(ours, dtype=torch.float64)
    ref = torch.as_tensor(np.asarray(official), dtype=torch.float64)
    if ours_t.shape != ref.shape:
        raise PipelineError(f"shape mismatch: ours {tuple(ours_t.shape)}, official {tuple(ref.shape)}")
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return float((ours_t - ref).abs().max()) / (scale if scale > 0 else 1.0)


def fixture_train_config(train: dict[str, Any], model: ProPy) -> TrainPropyConfig:
    """Our `train_propy` settings for the fixture's official hyper-parameters (refusing ones we cannot express)."""
    defaults = build_adamw([("w", torch.nn.Parameter(torch.zeros(1)))], 1.0, 0.0).defaults
    unsupported = {
        "betas": (tuple(train["betas"]), defaults["betas"]),
        "eps": (train["eps"], defaults["eps"]),
        "end_lr": (train["end_lr"], train["slow_start_lr"]),
        "logit_scale_clamp": (tuple(train["logit_scale_clamp"]), LOGIT_SCALE_RANGE),
        "gradient_accumulation_steps": (train["gradient_accumulation_steps"], 1),
        "total_steps": (train["total_steps"], train["epochs"] * train["batches_per_epoch"]),
    }
    wrong = {key: pair for key, pair in unsupported.items() if pair[0] != pair[1]}
    if wrong:
        raise PipelineError(f"fixture settings train-propy cannot reproduce (fixture, ours): {wrong}")
    return TrainPropyConfig(
        model=model.config,
        epochs=train["epochs"],
        batch_videos=train["batch_size_videos"],
        lr=train["lr"],
        warmup=train["warmup_proportion"],
        weight_decay=train["weight_decay"],
        grad_clip=train["clip_grad_norm"],
        lr_floor=train["slow_start_lr"],
        max_words=train["max_words"],
        device="cpu",
        amp=False,
    )


def run_official_steps(model: ProPy, cfg: TrainPropyConfig, steps: dict[str, np.ndarray], batches: int) -> dict:
    """Train `model` on the fixture's K batches with train-propy's trainer (`Trainer.fit`, stopped by `max_steps`
    after K updates); record what each update did."""
    device, count = torch.device("cpu"), int(steps["K"])
    trainer = build_trainer(model, replace(cfg, max_steps=count), batches, device)
    step = PropyStep(model, trainer, device)
    # every parameter the official code trains (the frozen CLIP aside), in or out of our optimiser
    names = {param: name for name, param in model.named_parameters() if not name.startswith("clip.")}
    records: list[dict[str, Any]] = []

    def before_update(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p, n in names.items()}
        clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        records.append(
            {
                "lr": [group["lr"] for group in optimizer.param_groups],
                "weight_decay": [group["weight_decay"] for group in optimizer.param_groups],
                **{key: value.clone() for key, value in step.last.items()},
                "grad_norm": float(trainer.grad_norm),
                "clip_coef": float(clipped / trainer.grad_norm),
                "grads": dict(official_name(n, g) for n, g in grads.items()),
            }
        )

    def after_update(*_: Any) -> None:
        records[-1]["state"] = dict(official_name(n, p.detach().clone()) for p, n in names.items())

    def fixture_batches(epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for k in range(epoch * batches + start, count):
            yield tuple(torch.from_numpy(steps[f"step{k}_{key}"]) for key in ("video", "text_ids", "text_labels"))

    trainer.optimizer.register_step_pre_hook(before_update)
    trainer.optimizer.register_step_post_hook(after_update)
    model.train()
    trainer.fit(fixture_batches, lambda batch: step.loss(*batch), lambda: None, lambda record: {})
    if len(records) != count:
        raise PipelineError(f"the loop made {len(records)} updates, the fixture has {count}")
    moments = {}
    for param, name in names.items():  # a parameter outside the optimiser has zero moments and no step
        state = trainer.optimizer.state.get(param) or {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param)}
        state.setdefault("exp_avg_sq", torch.zeros_like(param))
        for key, value in state.items():
            official, tensor = official_name(name, value) if value.dim() else (official_name(name, param)[0], value)
            moments[f"{key}/{official}"] = tensor.clone()
    return {"records": records, "moments": moments}


def compare_steps(run: dict, steps: dict[str, np.ndarray]) -> dict[str, float]:
    """Relative errors of one run against the fixture (keys listed in the module docstring)."""
    records, names = run["records"], [str(n) for n in steps["trainable_names"]]

    def worst(error: Callable[[int, dict[str, Any]], float]) -> float:
        return max(error(k, record) for k, record in enumerate(records))

    errors = {
        "lr": worst(lambda k, r: relative_error(r["lr"], steps["lr"][k, 2:])),
        "weight_decay": worst(lambda k, r: relative_error(r["weight_decay"], steps["weight_decay"][k, 2:])),
    }
    for key in ("loss", "t2v_loss", "v2t_loss", "grad_norm", "clip_coef"):
        errors[key] = worst(lambda k, r, key=key: relative_error(float(r[key]), steps[key][k]))
    errors["logits"] = worst(lambda k, r: relative_error(r["logits"], steps[f"step{k}_logits"]))
    errors["grad"] = worst(
        lambda k, r: max(relative_error(r["grads"][n], steps[f"grad/{n}"][k] * steps["clip_coef"][k]) for n in names)
    )
    for k, record in enumerate(records):
        state = record["state"]
        errors[f"state_step{k + 1}"] = max(relative_error(state[n], steps[f"state/{n}"][k + 1]) for n in names)
    moments = run["moments"]
    for key in ("exp_avg", "exp_avg_sq"):
        errors[key] = max(relative_error(moments[f"{key}/{n}"], steps[f"{key}/{n}"]) for n in names)
    errors["adam_step"] = max(abs(float(moments[f"step/{n}"]) - len(records)) for n in names)
    return errors


@dataclass(frozen=True)
class TrainFixture:
    """A training fixture: the official config, the steps file and the starting checkpoint."""

    config: dict[str, Any]
    steps: dict[str, np.ndarray]
    checkpoint: dict[str, Any]
    pyramid: PyramidConfig

    @classmethod
    def load(cls, prefix: str) -> TrainFixture:
        """Read PREFIX_config.json, PREFIX_steps.npz and the checkpoint the config names (beside them)."""
        paths = [Path(f"{prefix}_{suffix}") for suffix in ("config.json", "steps.npz")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise PipelineError(f"reference fixture files missing: {missing}")
        config = json.loads(paths[0].read_text())
        with np.load(paths[1]) as npz:
            steps = {key: npz[key] for key in npz.files}
        checkpoint = load_official_state(paths[0].parent / config["init_checkpoint"])
        pyramid = PyramidConfig.from_official(config["model"]["pyr_config"], f"{paths[0]}:model.pyr_config")
        return cls(config, steps, checkpoint, pyramid)

    def train(self, fast_path: bool = True, **options: Any) -> tuple[ProPy, dict[str, torch.Tensor], dict]:
        """Our loop on the fixture: (trained model, its frozen CLIP state at the start, the run's records).

        `options` replace fields of the `train_propy` config derived from the fixture (e.g. `lr_floor=0.0`).
        """
        train = self.config["train"]
        torch.manual_seed(int(train["seed"]))
        official = self.config["model"]
        model, clip_state = build_from_official(self.checkpoint, self.pyramid, official, fast_path=fast_path)
        cfg = replace(fixture_train_config(train, model), **options)
        return model, clip_state, run_official_steps(model, cfg, self.steps, train["batches_per_epoch"])

    def errors(self, fast_path: bool = True, **options: Any) -> dict[str, float]:
        """Relative errors of our loop against the fixture, and `frozen`: how far the frozen CLIP moved."""
        model, clip_state, run = self.train(fast_path, **options)
        errors = compare_steps(run, self.steps)
        current = model.clip.state_dict()
        errors["frozen"] = float(max((current[k] - v).abs().max() for k, v in clip_state.items()))
        return errors


@register_reference_check("propy-train", tolerance=TRAIN_TOLERANCE)
def check_propy_train(prefix: str) -> dict[str, float]:
    """Relative errors of `train-propy`'s loop on the fixture PREFIX_config.json + PREFIX_steps.npz, fast path
    and (`faithful_*`) the official computation."""
    fixture = TrainFixture.load(prefix)
    errors: dict[str, float] = {}
    for fast in (True, False):
        errors |= {("" if fast else "faithful_") + key: value for key, value in fixture.errors(fast).items()}
    return errors
