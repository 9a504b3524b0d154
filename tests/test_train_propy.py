"""The train_propy and evaluate@propy stages on a toy frame cache with the tiny CLIP: exact resume, metrics file."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from stages.data.checkpoint import load_checkpoint
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.frame_cache import FrameCache, FrameStorage, ensure_cache, new_staging_path, publish_video, write_video
from stages.data.schema import Query, write_queries
from stages.evaluate.evaluator import EvaluateConfig
from stages.models.clip_backbone import tokenize
from stages.models.propy import ProPyConfig
from stages.models.pyramid import PyramidConfig
from stages.models.trained import propy_dir
from stages.train.train_propy import (
    CaptionCollate,
    TrainPropyConfig,
    run_evaluate_propy,
    run_train_propy,
)

SPLITS = {"train": 8, "val": 4, "test": 4}
TOY_MODEL = ProPyConfig(
    pyramid=PyramidConfig(num_frames=4, offset=(1, 1)), num_visual_prompts=2, adapter_channels=8, adapter_kernel=3
)
TOY = TrainPropyConfig(model=TOY_MODEL, epochs=2, batch_videos=2, lr=1e-3, max_words=12, device="cpu")


def cache_video(cache_path: Path, video_id: str, frames: np.ndarray) -> None:
    staged = write_video(new_staging_path(cache_path, video_id), frames, {}, FrameStorage())
    publish_video(staged, cache_path, video_id)


def make_dataset(root: Path, clip_weights: Path) -> BaseConfig:
    """A toy dataset: random 64 px frames, 1-3 captions per video, frames cached under `root`."""
    base = BaseConfig(
        dataset="toy",
        seed=3,
        cache_dir=str(root / "cache"),
        metrics_dir=str(root / "metrics"),
        clip_weights=str(clip_weights),
    )
    rng = np.random.default_rng(0)
    ensure_cache(base.frames_path)
    queries = []
    for split, count in SPLITS.items():
        for v in range(count):
            video_id = f"{split}{v}"
            frames = rng.integers(0, 256, size=(int(rng.integers(3, 9)), 64, 64, 3), dtype=np.uint8)
            cache_video(base.frames_path, video_id, frames)
            for c in range(1 + v % 3):
                text = f"a {['red', 'blue', 'green'][c]} shape number {v} moves in {split}"
                queries.append(Query(f"{video_id}#{c}", text, video_id, 10.0, ((1.0 * c, 1.0 * c + 4.0),), split))
    write_queries(base.annotations_path, queries)
    return base


@pytest.fixture()
def toy_base(tmp_path: Path, tiny_clip_weights: Path) -> BaseConfig:
    return make_dataset(tmp_path / "a", tiny_clip_weights)


def trainable(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["trainable"]


def test_collate_concatenates_every_caption_with_its_video_index() -> None:
    collate = CaptionCollate([["a cat"], ["a dog", "two dogs", "no dog"], ["x"]], max_words=8)
    frames = [torch.full((4, 2, 2, 3), i, dtype=torch.uint8) for i in range(3)]
    batch_frames, ids, labels = collate([(frames[1], 1), (frames[2], 2), (frames[0], 0)])
    assert batch_frames.shape == (3, 4, 2, 2, 3) and batch_frames[0, 0, 0, 0, 0] == 1
    assert labels.tolist() == [0, 0, 0, 1, 2]
    assert torch.equal(ids, tokenize(["a dog", "two dogs", "no dog", "x", "a cat"], 8))


def test_killed_run_resumes_to_the_same_parameters(toy_base: BaseConfig, tmp_path: Path, tiny_clip_weights) -> None:
    run_train_propy(toy_base, TOY)
    whole = trainable(propy_dir(toy_base) / "last.pt")

    other = make_dataset(tmp_path / "b", tiny_clip_weights)
    run_train_propy(other, replace(TOY, max_steps=3, checkpoint_every_steps=2))  # stops in the middle of epoch 2
    stopped = load_checkpoint(propy_dir(other) / "last.pt")
    assert stopped["progress"]["step"] == 3 and stopped["progress"]["epoch"] == 0
    run_train_propy(other, replace(TOY, num_workers=2))  # a fresh start resumes (loader workers change nothing)
    resumed = load_checkpoint(propy_dir(other) / "last.pt")
    assert resumed["progress"]["step"] == 8 and resumed["progress"]["epoch"] == 2

    assert whole.keys() == resumed["trainable"].keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed["trainable"][name]), name
    history = (Path(toy_base.metrics_dir) / "toy" / "propy_history.tsv").read_text()
    assert history == (Path(other.metrics_dir) / "toy" / "propy_history.tsv").read_text()
    header, *rows = history.splitlines()
    assert header.split("\t") == ["epoch", "step", "loss", "lr", "split", "select_R1", "select_SumR"]
    assert [r.split("\t")[0] for r in rows] == ["1", "2"]


def test_checkpoint_holds_only_trainables_and_a_changed_config_starts_again(toy_base: BaseConfig) -> None:
    run_train_propy(toy_base, replace(TOY, max_steps=2))
    state = load_checkpoint(propy_dir(toy_base) / "last.pt")
    assert state["clip_sha256"] and state["model_config"] == TOY_MODEL.to_dict()
    assert not any(k.startswith("clip.") for k in state["trainable"])
    run_train_propy(toy_base, replace(TOY, epochs=1))
    assert (propy_dir(toy_base) / "best.pt").is_file()
    run_train_propy(toy_base, replace(TOY, lr=5e-4, max_steps=1))
    assert load_checkpoint(propy_dir(toy_base) / "last.pt")["progress"]["step"] == 1
    assert not (propy_dir(toy_base) / "best.pt").exists()  # the earlier run's selection is gone


def test_evaluation_writes_trained_and_untrained_metrics(toy_base: BaseConfig) -> None:
    run_train_propy(toy_base, replace(TOY, epochs=1))
    eval_cfg = EvaluateConfig()
    eval_cfg = replace(
        eval_cfg,
        protocol=replace(
            eval_cfg.protocol, efficiency=replace(eval_cfg.protocol.efficiency, corpus_sizes=(20,), repeats=1)
        ),
    )
    metrics = run_evaluate_propy(toy_base, replace(TOY, epochs=1), eval_cfg)
    written = json.loads((Path(toy_base.metrics_dir) / "toy" / "propy.json").read_text())
    assert written["split"] == "test" and written["num_videos"] == SPLITS["test"]
    for key in ("R1", "R5", "R10", "R100", "SumR", "MedR", "MeanR"):
        assert key in written and key in written["untrained"] and key in written["splits"]["val"]
    assert written["selection"]["split"] == "val" and written["selection"]["official"] is False
    assert written["chance_R1"] == pytest.approx(25.0)
    assert "0.5-r10" in written["moments"] and written["efficiency"]["params_trainable"] > 0
    assert metrics["R100"] == 100.0


def test_evaluation_without_a_trained_model_is_a_clear_error(toy_base: BaseConfig) -> None:
    with pytest.raises(PipelineError, match="train first"):
        run_evaluate_propy(toy_base, TOY, EvaluateConfig())


def _train_rank(rank: int, port: int, base: BaseConfig, cfg: TrainPropyConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    run_train_propy(base, cfg)


@pytest.mark.slow  # two processes that each import torch and open_clip: ~30 s idle, minutes on a busy machine
def test_two_gloo_ranks_train_like_one_process_with_the_same_global_batch(
    toy_base: BaseConfig, tmp_path: Path, tiny_clip_weights: Path
) -> None:
    single = replace(TOY, batch_videos=2, max_steps=2, select_split="last")
    run_train_propy(toy_base, single)
    ranks = make_dataset(tmp_path / "ddp", tiny_clip_weights)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_train_rank, args=(port, ranks, replace(single, batch_videos=1, threads=1)), nprocs=2, join=True)
    expected, got = trainable(propy_dir(toy_base) / "last.pt"), trainable(propy_dir(ranks) / "last.pt")
    for name, tensor in expected.items():
        # Adam normalises each gradient, so float noise on near-zero gradients moves a weight by up to ~lr * 1e-2
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5)
    assert load_checkpoint(propy_dir(ranks) / "last.pt")["progress"]["step"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_training_with_amp_then_evaluation(toy_base: BaseConfig) -> None:
    cfg = replace(TOY, device="cuda", amp=True, epochs=1)
    run_train_propy(toy_base, cfg)
    state = load_checkpoint(propy_dir(toy_base) / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    metrics = run_evaluate_propy(toy_base, cfg, replace(EvaluateConfig(), also_splits=()))
    assert metrics["num_videos"] == SPLITS["test"]


def test_logit_scale_is_clamped_before_every_update_but_the_first(tiny_clip_weights: Path) -> None:
    """The official loop clamps clip.logit_scale to [0.1, 4.6052] after each update: step 0 sees the raw value."""
    from stages.models.clip_backbone import load_clip
    from stages.models.propy import ProPy
    from stages.train.train_propy import LOGIT_SCALE_RANGE, PropyStep, build_trainer

    clip, arch = load_clip(tiny_clip_weights)
    clip.logit_scale.data.fill_(5.0)
    model = ProPy(clip, arch, TOY_MODEL).train()
    trainer = build_trainer(model, TOY, steps_per_epoch=4, device=torch.device("cpu"))
    step = PropyStep(model, trainer, torch.device("cpu"))
    frames = torch.randn(2, 4, 3, 64, 64)
    ids, labels = tokenize(["a red square", "a blue disc"], 12), torch.tensor([0, 1])
    first, _ = step.loss(frames, ids, labels)
    assert model.clip.logit_scale.item() == 5.0
    trainer.progress.step = 1
    second, _ = step.loss(frames, ids, labels)
    assert model.clip.logit_scale.item() == pytest.approx(LOGIT_SCALE_RANGE[1])
    assert step.last["logits"].abs().max() < first.new_tensor(100.0)  # exp(4.6052) = 100 bounds the logits
    assert not torch.equal(first, second)


def test_dead_parameters_are_trained_with_zero_gradients_or_frozen(tiny_clip_weights: Path) -> None:
    from stages.models.clip_backbone import load_clip
    from stages.models.propy import ProPy
    from stages.train.train_propy import PropyStep, build_trainer

    clip, arch = load_clip(tiny_clip_weights)
    for decay in (True, False):
        model = ProPy(clip, arch, TOY_MODEL).train()
        dead = {id(p) for p in model.dead_parameters()}
        assert len(dead) == 2 + 6  # postfix weight and bias, the last adapter's three layers
        trainer = build_trainer(model, replace(TOY, decay_dead_parameters=decay), 4, torch.device("cpu"))
        in_optimiser = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert (dead <= in_optimiser) == decay and (dead & in_optimiser == set()) != decay
        loss, _ = PropyStep(model, trainer, torch.device("cpu")).loss(
            torch.randn(2, 4, 3, 64, 64), tokenize(["a", "b"], 12), torch.tensor([0, 1])
        )
        loss.backward()
        grads = [p.grad for p in model.dead_parameters()]
        assert all(g is not None and not g.any() for g in grads) if decay else all(g is None for g in grads)


def test_jpeg_frames_decoded_by_the_trainer_train_like_frames_decoded_by_the_workers(
    tmp_path: Path, tiny_clip_weights: Path
) -> None:
    bases = {}
    for on_device in (False, True):
        base = make_dataset(tmp_path / str(on_device), tiny_clip_weights)
        cache = FrameCache(base.frames_path)
        for video_id in cache.video_ids():  # the same toy videos, JPEG-coded
            frames = cache.read(video_id)
            staged = write_video(new_staging_path(base.frames_path, video_id), frames, {}, FrameStorage("jpeg"))
            publish_video(staged, base.frames_path, video_id)
        run_train_propy(base, replace(TOY, max_steps=3, decode_on_device=on_device, select_split="last"))
        bases[on_device] = trainable(propy_dir(base) / "last.pt")
    for name, tensor in bases[False].items():
        assert torch.equal(tensor, bases[True][name]), name


def test_decoding_on_the_device_needs_a_jpeg_cache(toy_base: BaseConfig) -> None:
    with pytest.raises(PipelineError, match="needs a JPEG frame cache"):
        run_train_propy(toy_base, replace(TOY, decode_on_device=True))
