"""Checkpoints: atomic writes that survive SIGKILL, weights-only loading, exact RNG round trips."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.checkpoint import load_checkpoint, save_checkpoint
from stages.data.errors import PipelineError
from stages.data.rng import capture_rng, restore_rng

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_keeps_tensors_and_primitives(tmp_path: Path) -> None:
    payload = {"trainable": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "cfg": {"kernel": (5, 3), "name": "x"}}
    save_checkpoint(tmp_path / "ck.pt", payload)
    loaded = load_checkpoint(tmp_path / "ck.pt")
    assert torch.equal(loaded["trainable"]["w"], payload["trainable"]["w"])
    assert loaded["step"] == 7 and loaded["cfg"] == {"kernel": (5, 3), "name": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_objects_are_refused_by_weights_only_loading(tmp_path: Path) -> None:
    torch.save({"format": 1, "obj": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_truncated_and_missing_files_are_clear_errors(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ck.pt", {"w": torch.zeros(1000)})
    data = (tmp_path / "ck.pt").read_bytes()
    (tmp_path / "ck.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="delete it"):
        load_checkpoint(tmp_path / "ck.pt")
    with pytest.raises(PipelineError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng()})
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


_WRITER = """
import sys, torch
from stages.data.checkpoint import save_checkpoint
step = 0
while True:
    step += 1
    save_checkpoint(sys.argv[1], {"step": step, "w": torch.full((2_000_000,), float(step))})
    print(step, flush=True)
"""


def test_sigkill_during_writes_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few complete writes happen, then kill it mid-way through a later one
            assert proc.stdout.readline(), "the writer died"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    loaded = load_checkpoint(target)
    assert loaded["step"] >= 3 and torch.all(loaded["w"] == float(loaded["step"]))
    save_checkpoint(target, {"step": 0})  # the next writer removes what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
