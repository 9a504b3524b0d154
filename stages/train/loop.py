"""A generic, resumable epoch/step loop: device and mixed precision, clipped AdamW updates, progress, checkpoints.

The model-specific part is one `loss_fn(batch) -> (loss, items)`; the loop sets the scheduled learning rate,
runs the forward pass under autocast (bf16 on GPUs that support it, fp16 with a GradScaler otherwise, fp32 on CPU),
back-propagates, clips the global norm and steps. Under torchrun, `loss_fn` calls the module wrapped by
`distributed.wrap_ddp`, whose backward pass averages the gradients over ranks. The loop calls `save` every
`checkpoint_every_steps` updates and after every epoch, and resumes from `Trainer.load_state_dict` in the middle of
an epoch (the batch source must skip the batches already trained, see `GlobalBatchSampler`); `Trainer.stop` ends
training early (early stopping), for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from stages.data.device import autocast, autocast_dtype
from stages.data.progress import progress_bar
from stages.train.distributed import is_main_process


class Schedule(Protocol):
    """A learning rate that is a pure function of the global step (e.g. `optim.WarmupCosine`)."""

    def lr(self, step: int) -> float:
        """The learning rate of the update with 0-based index `step`."""

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set the optimiser's rate for update `step` (if the optimiser does not schedule itself); return it."""


@dataclass(frozen=True)
class LoopConfig:
    """How long to train and when to checkpoint."""

    epochs: int
    steps_per_epoch: int
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    checkpoint_every_steps: int = 0  # also checkpoint every N updates (0 = only after each epoch)
    max_steps: int = 0  # stop (with a checkpoint) after this many updates in total; 0 = train to the end
    progress: bool = True  # a progress bar per epoch (on rank 0)


@dataclass
class LoopProgress:
    """Where training is: what a checkpoint needs to resume the loop exactly."""

    epoch: int = 0  # the epoch in progress (0-based); equals `epochs` when training is finished
    step_in_epoch: int = 0  # updates already done in that epoch
    step: int = 0  # updates done in total
    loss_sum: float = 0.0  # sum of this epoch's step losses (for the epoch mean)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    stopped: bool = False  # ended early by `Trainer.stop` (e.g. early stopping); a resumed run does not continue


class Trainer:
    """Owns the optimiser, the schedule, mixed precision and the loop progress."""

    def __init__(
        self,
        parameters: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        device: torch.device,
        amp: bool,
        cfg: LoopConfig,
    ) -> None:
        self.parameters = parameters
        self.optimizer = optimizer
        self.schedule = schedule
        self.device = device
        self.cfg = cfg
        self.dtype = autocast_dtype(device, amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.progress = LoopProgress()
        self.grad_norm: torch.Tensor | None = None  # global gradient norm of the last update, before clipping

    @property
    def finished(self) -> bool:
        """True once every epoch has run or training was stopped."""
        return self.progress.stopped or self.progress.epoch >= self.cfg.epochs

    def stop(self) -> None:
        """End training after the current epoch (call it from `end_epoch`)."""
        self.progress.stopped = True

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, grad scaler and loop progress (tensors and primitives only)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = LoopProgress(**state["progress"])

    def step(self, loss_fn: Callable[[Any], tuple[torch.Tensor, int]], batch: Any) -> tuple[float, int]:
        """One update on `batch`; returns the loss and the number of items the batch held."""
        self.schedule.apply(self.optimizer, self.progress.step)
        with autocast(self.device, self.dtype):
            loss, items = loss_fn(batch)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), items

    def fit(
        self,
        batches: Callable[[int, int], Iterable[Any]],
        loss_fn: Callable[[Any], tuple[torch.Tensor, int]],
        save: Callable[[], None],
        end_epoch: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> bool:
        """Train until the last epoch (or `max_steps`); return True when training is finished.

        Args:
            batches: `(epoch, start_batch)` -> the epoch's batches from `start_batch` on.
            loss_fn: batch -> (loss, number of items in it, for throughput).
            save: writes a checkpoint (called on every rank; the callee decides who writes).
            end_epoch: the epoch's record (1-based epoch, step, mean loss, last lr) -> fields to add to it (e.g.
                validation scores); the record is then appended to `progress.history`.
        """
        cfg, progress = self.cfg, self.progress
        while not self.finished:
            epoch = progress.epoch
            bar = progress_bar(
                total=cfg.steps_per_epoch,
                initial=progress.step_in_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not (cfg.progress and is_main_process()),
                leave=False,
            )
            started, items_seen = time.perf_counter(), 0
            for batch in batches(epoch, progress.step_in_epoch):
                loss, items = self.step(loss_fn, batch)
                items_seen += items
                progress.step += 1
                progress.step_in_epoch += 1
                progress.loss_sum += loss
                rate = items_seen / max(1e-9, time.perf_counter() - started)
                lr = self.schedule.lr(progress.step - 1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=f"{rate:.1f} items/s")
                bar.update()
                stop = cfg.max_steps and progress.step >= cfg.max_steps
                if stop or (cfg.checkpoint_every_steps and progress.step % cfg.checkpoint_every_steps == 0):
                    save()
                if stop:
                    bar.close()
                    return False
            bar.close()
            record = {
                "epoch": epoch + 1,
                "step": progress.step,
                "loss": progress.loss_sum / cfg.steps_per_epoch,
                "lr": self.schedule.lr(progress.step - 1),
            }
            record.update(end_epoch(dict(record)))
            progress.history.append(record)
            progress.epoch, progress.step_in_epoch, progress.loss_sum = epoch + 1, 0, 0.0
            save()
        return True
