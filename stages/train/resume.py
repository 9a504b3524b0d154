"""Resumable runs, shared by ProPy's and the baselines' training: `last.pt`, its fingerprint, exact resume.

    checkpoint = RunCheckpoint(out / "last.pt", run_fingerprint(cfg, RUNTIME_KEYS, "batch_size", world, ids), "x")
    checkpoint.resume(trainer, lambda state: model.load_state_dict(state["weights"]))   # False: from scratch
    trainer.fit(batches, loss_fn, lambda: checkpoint.save(trainer, weights=model.state_dict()), end_epoch)

`last.pt` (written by rank 0, atomically, while the other ranks wait) holds the caller's entries (weights, ...), the
loop's state (optimiser, grad scaler, progress in the epoch), every RNG state and the run's fingerprint: what must
be equal for the checkpoint to be resumed, the training and model code included (`source_sha256`). A run of another
configuration or code starts from scratch (so a `dvc repro` after a code change retrains); keys that only change how
fast a run goes or where it stops (workers, device, checkpoint interval, max_steps) are left out of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.data.checkpoint import load_checkpoint, save_checkpoint
from stages.data.rng import capture_rng, restore_rng
from stages.train.distributed import WorldInfo, barrier, is_main_process, log_main
from stages.train.loop import Trainer

STAGES = Path(__file__).resolve().parents[1]


def source_sha256(*packages: str) -> str:
    """One hash of every Python file under the given folders of `stages` (e.g. "train", "models")."""
    digest = hashlib.sha256()
    for path in sorted(p for package in packages for p in (STAGES / package).rglob("*.py")):
        digest.update(path.relative_to(STAGES).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(
    cfg: Any, runtime_keys: Collection[str], batch_key: str, world: WorldInfo, train_ids: Sequence[str], **identity: Any
) -> dict[str, Any]:
    """What must be equal to resume: the config dataclass `cfg` less `runtime_keys`, with its per-rank batch size
    `batch_key` turned into the global batch, a hash of the training items' ids, and `identity` (seed, weights...)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in runtime_keys}
    settings["global_batch"] = settings.pop(batch_key) * world.world_size
    items = hashlib.sha256("\n".join(train_ids).encode()).hexdigest()
    code = source_sha256("data", "models", "train")
    return {**identity, "code": code, "train_items": items, "config": json.dumps(settings, sort_keys=True, default=str)}


@dataclass(frozen=True)
class RunCheckpoint:
    """The `last.pt` of one run (`name` prefixes the log lines, e.g. the stage)."""

    path: Path
    fingerprint: dict[str, Any]
    name: str

    def save(self, trainer: Trainer, **entries: Any) -> None:
        """Write `entries`, the trainer's state, the RNG states and the fingerprint (rank 0; every rank waits)."""
        if is_main_process():
            payload = {**entries, "fingerprint": self.fingerprint, "rng": capture_rng(), **trainer.state_dict()}
            save_checkpoint(self.path, payload)
        barrier()

    def resume(self, trainer: Trainer, restore: Callable[[dict[str, Any]], None]) -> bool:
        """Load the checkpoint if this configuration wrote it: `restore(state)` (the caller's entries), then the
        trainer and the RNG states. Returns whether it did."""
        if not self.path.is_file():
            return False
        state = load_checkpoint(self.path)
        if state.get("fingerprint") != self.fingerprint:
            log_main(f"{self.name}: {self.path} was written by another configuration; starting from scratch")
            return False
        restore(state)
        trainer.load_state_dict(state)
        restore_rng(state["rng"])
        progress = trainer.progress
        log_main(f"{self.name}: resuming from {self.path} (epoch {progress.epoch + 1}, step {progress.step})")
        return True
