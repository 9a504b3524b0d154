"""Data parallelism: world info from the environment, the resumable global-batch sampler, and a 2-process gloo run
whose loss and gradients equal one process on the same global batch."""

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
    average_gradients,
    cleanup_distributed,
    gather_embeddings,
    init_distributed,
    is_main_process,
    world_info_from_env,
)


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
    with pytest.raises(PipelineError, match="batch_videos"):
        GlobalBatchSampler(5, 4, WorldInfo(world_size=2), seed=0)


# ---- two gloo processes versus one process -----------------------------------------------------------------------

NUM_VIDEOS, FEATURE, EVENTS, EMBED = 6, 5, 3, 4
CAPTIONS = [1, 3, 2, 1, 2, 4]  # uneven: the two ranks hold 6 and 7 captions


class TinyRetrieval(torch.nn.Module):
    """A stand-in encoder pair: videos [B, F] -> events [B, Ne, E], captions [Nt, F] -> [Nt, E]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.video = torch.nn.Linear(FEATURE, EVENTS * EMBED)
        self.text = torch.nn.Linear(FEATURE, EMBED)
        self.double()  # float64, so that the two reduction orders agree to ~1e-12

    def loss(self, videos: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        events = self.video(videos).view(-1, EVENTS, EMBED)
        queries = self.text(texts)
        events, queries, labels = gather_embeddings(events, queries, labels)
        return contrastive_loss(queries, events, labels)


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
    return videos, texts, labels


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    info = init_distributed(torch.device("cpu"))
    try:
        videos, texts, labels = global_batch()
        per_rank = NUM_VIDEOS // 2
        mine = (labels >= rank * per_rank) & (labels < (rank + 1) * per_rank)
        model = TinyRetrieval()
        loss = model.loss(videos[rank * per_rank : (rank + 1) * per_rank], texts[mine], labels[mine] - rank * per_rank)
        loss.backward()
        average_gradients(list(model.parameters()))
        result = {"loss": loss.detach(), "main": is_main_process(), "world": info.world_size}
        result["grads"] = {name: p.grad for name, p in model.named_parameters()}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    pytest.importorskip("stages.models.propy")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    model = TinyRetrieval()
    loss = model.loss(*global_batch())
    loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["main"] == (rank == 0) and result["world"] == 2
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=0, atol=1e-10)
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], param.grad, rtol=0, atol=1e-10)
