"""Data parallelism: world info from the environment, the resumable global-batch sampler, and 2-process gloo runs
under torch DDP whose loss and gradients equal one process on the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from stages.data.errors import PipelineError
from stages.train.distributed import (
    GlobalBatchSampler,
    WorldInfo,
    distributed_run,
    gather_batch,
    gather_embeddings,
    is_main_process,
    world_info_from_env,
    wrap_ddp,
)
from tests.tiny_baselines import TINY_BASELINES, tiny_keys


def test_world_info_reads_torchrun_then_slurm_then_defaults_to_one_process() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert world_info_from_env(torchrun) == WorldInfo(rank=3, world_size=8, local_rank=1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}
    assert world_info_from_env(slurm) == WorldInfo(rank=5, world_size=6, local_rank=2)
    assert world_info_from_env({}) == WorldInfo() and not WorldInfo().distributed


def test_sampler_is_deterministic_per_epoch_and_drops_the_incomplete_tail() -> None:
    sampler = GlobalBatchSampler(23, 4, WorldInfo(), seed=7)
    assert len(sampler) == 5
    first = list(sampler)
    assert first == list(sampler) and all(len(b) == 4 for b in first)
    assert len({i for b in first for i in b}) == 20
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert GlobalBatchSampler(23, 4, WorldInfo(), seed=8).__iter__().__next__() != first[0]


def test_sampler_resumes_mid_epoch_and_ranks_split_the_same_global_batches() -> None:
    whole = GlobalBatchSampler(40, 6, WorldInfo(), seed=1)
    whole.set_epoch(2)
    global_batches = list(whole)
    whole.set_epoch(2, start_batch=4)
    assert list(whole) == global_batches[4:]
    ranks = [GlobalBatchSampler(40, 3, WorldInfo(rank=r, world_size=2), seed=1) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    assert [a + b for a, b in zip(*ranks, strict=True)] == global_batches


def test_sampler_refuses_a_batch_larger_than_the_dataset() -> None:
    with pytest.raises(PipelineError, match="batch size"):
        GlobalBatchSampler(5, 4, WorldInfo(world_size=2), seed=0)


def test_sampler_keeps_the_tail_and_sorts_each_global_batch_when_asked() -> None:
    key = [7, 3, 9, 1, 5, 5, 2, 8, 6, 4, 0]
    whole = GlobalBatchSampler(11, 4, WorldInfo(), seed=3, drop_last=False, sort_key=key)
    batches = list(whole)
    assert [len(b) for b in batches] == [4, 4, 3] and sorted(i for b in batches for i in b) == list(range(11))
    assert all([key[i] for i in b] == sorted((key[i] for i in b), reverse=True) for b in batches)
    ranks = [GlobalBatchSampler(11, 2, WorldInfo(r, 2), seed=3, drop_last=False, sort_key=key) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == batches  # the tail of 3 is split 2 + 1
    assert len(GlobalBatchSampler(9, 4, WorldInfo(0, 2), seed=3, drop_last=False)) == 1  # a tail of 1 < 2 ranks


# ---- two gloo processes versus one process -----------------------------------------------------------------------

NUM_VIDEOS, FEATURE, EVENTS, EMBED = 6, 5, 3, 4
CAPTIONS = [1, 3, 2, 1, 2, 4]  # uneven: the two ranks hold 6 and 7 captions


class TinyRetrieval(torch.nn.Module):
    """A stand-in encoder pair: videos [B, F] -> events [B, Ne, E], captions [Nt, F] -> [Nt, E].

    `long_text` only acts on captions whose first feature is > 1 (none of them on rank 0: a parameter unused on one
    rank), `scale` acts after the gather (a parameter used by every rank on the whole batch), `spare` is never used.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.video = torch.nn.Linear(FEATURE, EVENTS * EMBED)
        self.text = torch.nn.Linear(FEATURE, EMBED)
        self.long_text = torch.nn.Linear(FEATURE, EMBED)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.spare = torch.nn.Linear(2, 2)
        self.double()  # float64, so that the two reduction orders agree to ~1e-12

    def forward(self, videos: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        events = self.video(videos).view(-1, EVENTS, EMBED)
        queries = self.text(texts)
        long = texts[:, 0] > 1.0
        if long.any():
            queries = queries + long[:, None] * self.long_text(texts)
        events, queries, labels = gather_embeddings(events, queries, labels)
        return self.scale * contrastive_loss(queries, events, labels)


def contrastive_loss(queries: torch.Tensor, events: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ProPy's loss over its MIL similarity: 100 x the best event's cosine (docs/propy_official_code.md §4)."""
    from stages.models.propy import propy_loss

    cosine = torch.einsum("te,bke->tbk", F.normalize(queries, dim=-1), F.normalize(events, dim=-1))
    return propy_loss(100.0 * cosine.amax(dim=-1), labels)[0]


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    videos = torch.randn(NUM_VIDEOS, FEATURE, generator=generator, dtype=torch.float64)
    texts = torch.randn(sum(CAPTIONS), FEATURE, generator=generator, dtype=torch.float64)
    labels = torch.repeat_interleave(torch.arange(NUM_VIDEOS), torch.tensor(CAPTIONS))
    texts[:, 0] = texts[:, 0].clamp(max=0.9)
    texts[labels == NUM_VIDEOS - 1, 0] = 2.0  # the last video's captions take the `long_text` branch
    return videos, texts, labels


def _join(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)


def _worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    with distributed_run("cpu") as (world, device):
        videos, texts, labels = global_batch()
        per_rank = NUM_VIDEOS // 2
        mine = (labels >= rank * per_rank) & (labels < (rank + 1) * per_rank)
        model = TinyRetrieval()
        ddp = wrap_ddp(model, device)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        loss = ddp(videos[rank * per_rank : (rank + 1) * per_rank], texts[mine], labels[mine] - rank * per_rank)
        loss.backward()
        result = {"loss": loss.detach(), "main": is_main_process(), "world": world.world_size}
        result["grads"] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        torch.save(result, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    pytest.importorskip("stages.models.propy")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    model = TinyRetrieval()
    loss = model(*global_batch())
    loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert "long_text.weight" in expected and "scale" in expected and "spare.weight" not in expected
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["main"] == (rank == 0) and result["world"] == 2
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=0, atol=1e-10)
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-10)


# ---- the baselines: DDP and gathered encodings give one process's loss and gradients -----------------------------

BASELINE_DIMS = {"visual_input_size": 6, "query_input_size": 5}
FRAMES = [9, 4, 14, 6, 3, 11]  # rows 9, 4, 10 (resampled), 6, 3, 10: the ranks pad to different lengths
QUERIES = [1, 3, 2, 1, 2, 3]


def baseline_model(name: str) -> torch.nn.Module:
    """A freshly seeded float64 model of the test's dimensions."""
    from stages.models import build_model, model_spec

    torch.manual_seed(0)
    return build_model(name, cfg=model_spec(name).config(**BASELINE_DIMS, **tiny_keys(name))).double()


def baseline_items(name: str) -> list:
    """The global batch's training items, preprocessed for the model and sorted as
    `GlobalBatchSampler(sort_key=frame_rows)` leaves them."""
    from stages.data.schema import Query
    from stages.models.baselines.data import VideoQueryDataset

    rng = torch.Generator().manual_seed(4)
    videos, texts, queries = {}, {}, []
    for v, (frames, count) in enumerate(zip(FRAMES, QUERIES, strict=True)):
        videos[f"v{v}"] = torch.randn(frames, 6, generator=rng).numpy()
        for k in range(count):
            texts[f"v{v}#{k}"] = torch.randn(2 + (v + k) % 4, 5, generator=rng).numpy()
            queries.append(Query(f"v{v}#{k}", "q", f"v{v}", 10.0, (), "train"))
    dataset = VideoQueryDataset(queries, videos, texts, baseline_model(name).preprocess_config())
    rows = dataset.frame_rows()
    return [dataset[i] for i in sorted(range(len(dataset)), key=lambda i: -rows[i])]


def _as_float64(batch):  # noqa: ANN001, ANN202 - any batch dataclass
    """The batch with every floating-point tensor in float64."""
    import dataclasses

    return dataclasses.replace(
        batch,
        **{
            item.name: value.double()
            for item in dataclasses.fields(batch)
            if isinstance(value := getattr(batch, item.name), torch.Tensor) and value.is_floating_point()
        },
    )


def baseline_loss(name: str, items: list, gather=None, device: torch.device | None = None) -> tuple:  # noqa: ANN001
    """The total training loss of `items` (float64) from a freshly seeded model, the model and its DDP wrapper."""
    from stages.models.baselines.data import TrainBatch, collate_train
    from stages.models.baselines.losses import NegativeSampling
    from stages.train.baseline_training import _padded_as_one_process

    model = baseline_model(name)
    batch = _padded_as_one_process(collate_train(items), device or torch.device("cpu"))
    batch = TrainBatch(_as_float64(batch.videos), _as_float64(batch.queries))
    module = wrap_ddp(model, device or torch.device("cpu"))
    generator = torch.Generator().manual_seed(5)
    losses, _ = module(batch, NegativeSampling(hard=True, pool_size=2), generator, gather=gather)
    return losses["total"], model, module


def _baseline_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    with distributed_run("cpu") as (_, device):
        for name in TINY_BASELINES:
            mine = baseline_items(name)[rank * 3 : (rank + 1) * 3]
            loss, model, _ddp = baseline_loss(name, mine, gather_batch, device)
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            torch.save({"loss": loss.detach(), "grads": grads}, Path(out) / f"{name}{rank}.pt")


def test_two_gloo_ranks_train_baselines_like_one_process(tmp_path: Path) -> None:
    """Every baseline's batch-level terms (MS-SL's and GMMFormer's, Prototypes' decoders and guidance, GMMFormer v2's
    QDL and clip assignment, MSC's video-level alignment and RKD, AMDNet's span and moment terms, HLFormer's
    entailment) see the global batch: 2 ranks of 3 videos give one process's loss and gradients on all 6."""
    mp.spawn(_baseline_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for name in TINY_BASELINES:
        loss, model, _ = baseline_loss(name, baseline_items(name))
        loss.backward()
        expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        for rank in range(2):
            result = torch.load(tmp_path / f"{name}{rank}.pt", weights_only=True)
            torch.testing.assert_close(result["loss"], loss.detach(), rtol=0, atol=1e-10, msg=name)
            assert result["grads"].keys() == expected.keys(), name
            for key, grad in expected.items():
                torch.testing.assert_close(result["grads"][key], grad, rtol=1e-9, atol=1e-10, msg=f"{name} {key}")
