"""Data-parallel training the torchrun way: ranks from the environment, gather-with-gradient, a resumable sampler.

Rank, world size and local rank come from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or SLURM (`SLURM_PROCID`,
`SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`/`MASTER_PORT` set by the job script); without them the run is a
single process. The contrastive loss needs every rank's embeddings: `gather_embeddings` all-gathers the fixed-size
video embeddings and the text embeddings padded to the largest caption count, with their global video indices,
and lets gradients flow back to the rank that produced each row. Every rank then computes the same global loss;
`average_gradients` makes the parameter update equal to that of one process on the whole global batch.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stages.data.errors import PipelineError


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def world_info_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    """Rank, world size and local rank from torchrun's variables, else SLURM's, else a single process."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env and "RANK" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return WorldInfo()


def init_distributed(device: torch.device, timeout_minutes: int = 60) -> WorldInfo:
    """Join the process group when launched by torchrun/SLURM (NCCL on CUDA, gloo on CPU); no-op otherwise."""
    info = world_info_from_env()
    if not info.distributed or dist.is_initialized():
        return info
    if not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise PipelineError(
            f"rank {info.rank} of {info.world_size}: MASTER_ADDR and MASTER_PORT are not set; launch with "
            "`torchrun --nproc_per_node=N pipeline.py train-propy` or export them in the SLURM job script"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return info


def cleanup_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs, evaluates and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along a new leading axis; the backward pass sums the gradients of all ranks and keeps ours."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_embeddings(
    videos: torch.Tensor, texts: torch.Tensor, text_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the global batch from every rank, keeping gradients.

    Args:
        videos: this rank's video embeddings [B, ...] (B equal on every rank).
        texts: this rank's caption embeddings [Nt, E] (Nt may differ between ranks).
        text_labels: local video index of each caption [Nt].

    Returns:
        All videos [W*B, ...] in rank order, all captions [sum Nt, E] and their global video indices.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return videos, texts, text_labels
    world, device = dist.get_world_size(), texts.device
    sizes = torch.tensor([videos.shape[0], texts.shape[0]], device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    video_counts = [int(s[0]) for s in all_sizes]
    text_counts = [int(s[1]) for s in all_sizes]
    if len(set(video_counts)) != 1:
        raise RuntimeError(f"every rank must hold the same number of videos per batch, got {video_counts}")
    all_videos = _GatherWithGrad.apply(videos).flatten(0, 1)
    longest = max(text_counts)
    padded = torch.nn.functional.pad(texts, (0, 0, 0, longest - texts.shape[0]))
    gathered = _GatherWithGrad.apply(padded)
    labels = torch.full((longest,), -1, dtype=text_labels.dtype, device=device)
    labels[: text_labels.shape[0]] = text_labels
    label_parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(label_parts, labels)
    per_rank = videos.shape[0]
    all_texts = torch.cat([gathered[r, :n] for r, n in enumerate(text_counts)])
    all_labels = torch.cat([label_parts[r][:n] + r * per_rank for r, n in enumerate(text_counts)])
    return all_videos, all_texts, all_labels


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of `parameters` over ranks in one flat all-reduce (what DDP would do)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class GlobalBatchSampler:
    """Deterministic, resumable batches of dataset indices for one rank.

    Each epoch shuffles all indices with a generator seeded by (seed, epoch), drops the tail that does not fill a
    global batch of `batch_size * world_size`, and gives rank r the r-th slice of every global batch. The global
    batches therefore do not depend on how they are split over ranks, and `set_epoch(epoch, start_batch)` resumes
    in the middle of an epoch.
    """

    def __init__(self, num_items: int, batch_size: int, world: WorldInfo, seed: int) -> None:
        self.num_items, self.batch_size, self.world, self.seed = num_items, batch_size, world, seed
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise PipelineError(
                f"{num_items} training videos cannot fill one global batch of {batch_size} x {world.world_size} "
                "ranks; lower train_propy.batch_videos"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order and skip its first `start_batch` batches (already trained)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches per epoch (the full count, whatever `start_batch` is)."""
        return self.num_items // (self.batch_size * self.world.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        global_size = self.batch_size * self.world.world_size
        for b in range(self.start_batch, len(self)):
            start = b * global_size + self.world.rank * self.batch_size
            yield order[start : start + self.batch_size]
