"""The baseline stages: train on a feature store, save, reload and evaluate with the shared protocol; a run killed
with SIGKILL resumes to the same weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.data.checkpoint import load_checkpoint
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStoreInfo, FeatureStoreWriter
from stages.data.schema import Query, write_queries
from stages.evaluate.evaluator import EvalConfig, EvaluateConfig
from stages.train.baseline_training import BaselineTrainConfig
from stages.train.train_baseline import BaselineStageConfig, run_evaluate_baseline, run_train_baseline

DIM = 16
PROTOCOL = EvaluateConfig(EvalConfig(split="test", moment_retrieval=False, measure_efficiency=False), batch_videos=5)


REPO = Path(__file__).resolve().parents[1]


def toy_base(root: Path) -> BaseConfig:
    return BaseConfig(dataset="toy", cache_dir=str(root / "cache"), metrics_dir=str(root / "metrics"), clip_arch="toy")


@pytest.fixture()
def base(tmp_path: Path) -> BaseConfig:
    return make_dataset(tmp_path)


def make_dataset(root: Path) -> BaseConfig:
    """12 videos per split; each query's EOT token feature is (a noisy copy of) one frame of its video."""
    base = toy_base(root)
    rng = np.random.default_rng(0)
    info = FeatureStoreInfo("toy", "0" * 64, "3.3.0", "last", "none", "toy")
    queries = []
    with FeatureStoreWriter(base.features_path(), info) as store:
        for split in ("train", "val", "test"):
            for v in range(12):
                video_id = f"{split}{v}"
                frames = rng.normal(size=(int(rng.integers(6, 20)), DIM)).astype(np.float32)
                store.write("video", video_id, frames)
                for k in range(2):
                    query_id = f"{video_id}#{k}"
                    tokens = rng.normal(size=(int(rng.integers(3, 8)), DIM)).astype(np.float32)
                    tokens[-1] = frames[int(rng.integers(len(frames)))] + 0.01 * rng.normal(size=DIM)
                    store.write("text", query_id, tokens)
                    queries.append(Query(query_id, f"caption {k}", video_id, 10.0, ((0.0, 5.0),), split))
    write_queries(base.annotations_path, queries)
    return base


def test_frozen_clip_mil_finds_the_matching_frame(base: BaseConfig) -> None:
    metrics = run_evaluate_baseline(base, "clip_mil", BaselineStageConfig(), PROTOCOL)
    assert metrics["R1"] == 100.0 and metrics["split"] == "test" and metrics["num_videos"] == 12
    saved = json.loads((base.dataset_metrics / "clip_mil.json").read_text())
    assert saved["feature_source"] == "clip_toy.h5" and saved["selection"]["rule"].startswith("none")


def test_train_save_reload_evaluate_msl(base: BaseConfig) -> None:
    cfg = BaselineStageConfig(
        model={"hidden_size": 32, "n_heads": 2, "max_ctx_l": 16, "max_desc_l": 8, "map_size": 4},
        train=BaselineTrainConfig(n_epoch=2, batch_size=6, hard_negative_start_epoch=1, eval_video_batch=6),
    )
    with pytest.raises(PipelineError, match="no trained model"):
        run_evaluate_baseline(base, "msl", cfg, PROTOCOL)
    out = run_train_baseline(base, "msl", cfg)
    first = load_file(str(out / "model.safetensors"))
    again = load_file(str(run_train_baseline(base, "msl", cfg) / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed, same weights
    record = json.loads((out / "training.json").read_text())
    assert record["model_config"]["visual_input_size"] == DIM and len(record["history"]) >= 1
    metrics = run_evaluate_baseline(base, "msl", cfg, PROTOCOL)
    assert 0.0 <= metrics["R1"] <= 100.0 and metrics["selection"]["split"] == "val"
    assert set(metrics["splits"]) == {"val"} and metrics["untrained"]["num_videos"] == 12
    changed = BaselineStageConfig(model={**cfg.model, "hidden_size": 64}, train=cfg.train)
    with pytest.raises(PipelineError, match="another model config"):
        run_evaluate_baseline(base, "msl", changed, PROTOCOL)
    with pytest.raises(PipelineError, match="unknown model"):
        run_train_baseline(base, "no_such_model", cfg)
    reference = json.loads((run_train_baseline(base, "clip_mil", cfg) / "training.json").read_text())
    assert reference["trained"] is False and not (out.parent / "clip_mil" / "model.safetensors").exists()


# A run with dropout (the global RNG), hard negatives from epoch 1 (their generator) and a last, smaller batch.
RESUMED = BaselineStageConfig(
    model={"hidden_size": 16, "n_heads": 2, "max_ctx_l": 12, "max_desc_l": 8, "map_size": 4},
    train=BaselineTrainConfig(
        n_epoch=4, batch_size=5, hard_negative_start_epoch=1, max_es_cnt=10, eval_video_batch=6, device="cpu"
    ),
)
_KILLED_RUN = """
import sys, time, torch
from pathlib import Path
from dataclasses import replace
from stages.train.loop import Trainer
from tests.test_train_baseline import RESUMED, toy_base
from stages.train.train_baseline import run_train_baseline
torch.set_num_threads(1)
step = Trainer.step
def slow_step(self, loss_fn, batch):
    time.sleep(0.3)  # leaves time to kill it in the middle of an epoch
    return step(self, loss_fn, batch)
Trainer.step = slow_step
cfg = replace(RESUMED, train=replace(RESUMED.train, checkpoint_every_steps=1))
run_train_baseline(toy_base(Path(sys.argv[1])), "msl", cfg)
"""


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = run_train_baseline(make_dataset(tmp_path / "whole"), "msl", RESUMED)
    expected = load_file(str(whole / "model.safetensors"))
    expected_last = load_checkpoint(whole / "last.pt")
    assert expected_last["progress"]["step"] == 4 * 3  # 12 training videos in batches of 5: 3 steps per epoch

    killed = make_dataset(tmp_path / "killed")
    last = killed.dataset_cache / "baselines" / "msl" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path / "killed")], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not (last.is_file() and load_checkpoint(last)["progress"]["step"] >= 4):  # in epoch 2
            assert proc.poll() is None and time.monotonic() < deadline, "the training run ended before it was killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    at_kill = load_checkpoint(last)["progress"]
    assert 4 <= at_kill["step"] < 12 and not (last.parent / "model.safetensors").exists()

    resumed = run_train_baseline(killed, "msl", replace(RESUMED, train=replace(RESUMED.train, num_workers=1)))
    got = load_file(str(resumed / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    got_last = load_checkpoint(resumed / "last.pt")
    assert all(torch.equal(got_last["weights"][k], v) for k, v in expected_last["weights"].items())
    assert got_last["progress"]["history"] == expected_last["progress"]["history"]
    record = json.loads((resumed / "training.json").read_text())
    assert record["history"] == json.loads((whole / "training.json").read_text())["history"]


def test_max_steps_stops_and_a_changed_config_starts_again(base: BaseConfig) -> None:
    out = run_train_baseline(base, "msl", replace(RESUMED, train=replace(RESUMED.train, max_steps=2)))
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 2 and not (out / "model.safetensors").exists()
    other = replace(RESUMED, train=replace(RESUMED.train, lr=1e-3, n_epoch=1))
    run_train_baseline(base, "msl", other)  # another configuration: from scratch, one epoch
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 3 and (out / "model.safetensors").exists()


def _train_rank(rank: int, port: int, root: str, cfg: BaselineStageConfig) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    run_train_baseline(toy_base(Path(root)), "msl", cfg)


@pytest.mark.slow  # two processes importing torch: ~30 s idle, minutes on a busy machine
def test_two_gloo_ranks_train_a_baseline_like_one_process(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    model = {**RESUMED.model, "input_drop": 0.0, "drop": 0.0}  # dropout draws differ between ranks
    one = replace(RESUMED, model=model, train=replace(RESUMED.train, batch_size=6, n_epoch=3))
    expected = load_file(str(run_train_baseline(make_dataset(tmp_path / "one"), "msl", one) / "model.safetensors"))
    make_dataset(tmp_path / "two")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = replace(one, train=replace(one.train, batch_size=3))  # 3 videos per rank: the same global batch of 6
    mp.spawn(_train_rank, args=(port, str(tmp_path / "two"), two), nprocs=2, join=True)
    out = toy_base(tmp_path / "two").dataset_cache / "baselines" / "msl"
    got = load_file(str(out / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 3 * 2
