"""Data-parallel training the torchrun way: ranks from the environment, torch DDP, gather-with-gradient, a sampler.

Rank, world size and local rank come from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or SLURM (`SLURM_PROCID`,
`SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`/`MASTER_PORT` set by the job script); without them the run is a
single process (`distributed_run` joins and leaves the process group).

How a step equals one process on the global batch: the module that computes the loss is wrapped in torch
`DistributedDataParallel` (`wrap_ddp`: bucketed all-reduce of the gradients, overlapped with the backward pass;
parameters that get no gradient on some rank are handled). Inside it, each rank encodes its own part of the batch
and `gather_batch` all-gathers the per-video and per-query tensors of every rank, so that every rank computes the
same loss of the whole global batch. DDP averages gradients over the W ranks; the gather's backward therefore
passes W times the gradient of this rank's rows (and nothing is reduced inside backward), so that encoder
gradients add up to the single-process ones, while a parameter used after the gather gets the full gradient on
every rank, which averaging keeps. With dropout after the gather ranks draw their own masks (their losses then
differ slightly); the equality is exact without it (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from stages.data.device import resolve_device as resolve_config_device
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


def resolve_device(spec: str, world: WorldInfo) -> torch.device:
    """`auto` (the local rank's GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:K`."""
    device = resolve_config_device(spec)
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


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


@contextlib.contextmanager
def distributed_run(device_spec: str, threads: int = 0) -> Iterator[tuple[WorldInfo, torch.device]]:
    """This process's place in the job and its device, inside the process group (joined here, left at the end)."""
    world = world_info_from_env()
    device = resolve_device(device_spec, world)
    if threads:
        torch.set_num_threads(threads)
    joined = not dist.is_initialized()
    init_distributed(device)
    try:
        yield world, device
    finally:
        if joined:
            cleanup_distributed()


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs, evaluates and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; identity in a single process)."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def global_max(values: Sequence[int], device: torch.device) -> list[int]:
    """The element-wise maximum of `values` over ranks (identity in a single process)."""
    if not _active():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = True) -> nn.Module:
    """`module` in torch DistributedDataParallel when several ranks train, else `module` itself.

    Call the returned module once per step for the loss (its forward must compute everything the loss needs).
    Buffers are not re-synchronised every step (every rank builds them identically); `find_unused_parameters`
    lets a parameter go without a gradient on some rank (e.g. a branch only some batches take).
    """
    if not _active():
        return module
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=find_unused_parameters,
    )


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along a new leading axis; backward passes world_size x the gradient of this rank's part."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        return grad[dist.get_rank()] * dist.get_world_size()


def _gather_rows(tensor: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every rank's [n_r, ...] rows concatenated in rank order (trailing shapes must agree), keeping gradients."""
    padded = nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, max(counts) - tensor.shape[0]))
    gathered = _GatherWithGrad.apply(padded)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])


def gather_batch(
    videos: Mapping[str, torch.Tensor], queries: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """The global batch from every rank's part, keeping gradients (identity in a single process).

    Args:
        videos: this rank's per-video tensors [B_r, ...] (trailing shapes equal on every rank).
        queries: this rank's per-query tensors [Nq_r, ...] (trailing shapes equal on every rank).
        labels: local video index of each query [Nq_r].

    Returns:
        Every rank's videos and queries concatenated in rank order, and each query's index in the global videos.
    """
    if not _active():
        return dict(videos), dict(queries), labels
    device = labels.device
    num_videos = len(next(iter(videos.values())))
    sizes = torch.tensor([num_videos, labels.shape[0]], device=device)
    parts = [torch.empty_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, sizes)
    video_counts, query_counts = [int(p[0]) for p in parts], [int(p[1]) for p in parts]
    offsets = torch.tensor([sum(video_counts[:rank]) for rank in range(len(parts))], device=device)
    owner = torch.repeat_interleave(torch.arange(len(parts), device=device), torch.tensor(query_counts, device=device))
    all_labels = _gather_rows(labels, query_counts) + offsets[owner]
    all_videos = {name: _gather_rows(t, video_counts) for name, t in videos.items()}
    all_queries = {name: _gather_rows(t, query_counts) for name, t in queries.items()}
    return all_videos, all_queries, all_labels


def gather_embeddings(
    videos: torch.Tensor, texts: torch.Tensor, text_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gather_batch` of one per-video and one per-caption tensor (ProPy's events [B, Ne, E] and captions [Nt, E])."""
    all_videos, all_texts, all_labels = gather_batch({"videos": videos}, {"texts": texts}, text_labels)
    return all_videos["videos"], all_texts["texts"], all_labels


class GlobalBatchSampler:
    """Deterministic, resumable batches of dataset indices for one rank.

    Each epoch shuffles all indices with a generator seeded by (seed, epoch) and cuts global batches of
    `batch_size * world_size`; rank r gets the r-th contiguous slice of every global batch. The global batches
    therefore do not depend on how they are split over ranks, and `set_epoch(epoch, start_batch)` resumes in the
    middle of an epoch. `drop_last=False` keeps the last, smaller global batch (split as evenly as possible; it is
    dropped when it has fewer items than ranks). `sort_key` orders each global batch by descending key (stable)
    before it is split, so that the concatenated rank slices are the batch one process would see sorted.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        world: WorldInfo,
        seed: int,
        drop_last: bool = True,
        sort_key: Sequence[int] | None = None,
    ) -> None:
        self.num_items, self.batch_size, self.world, self.seed = num_items, batch_size, world, seed
        self.drop_last, self.sort_key = drop_last, sort_key
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise PipelineError(
                f"{num_items} training videos cannot fill one global batch of {batch_size} x {world.world_size} "
                "ranks; lower the batch size"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order and skip its first `start_batch` batches (already trained)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches per epoch (the full count, whatever `start_batch` is)."""
        full, tail = divmod(self.num_items, self.batch_size * self.world.world_size)
        return full + int(not self.drop_last and tail >= self.world.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        global_size = self.batch_size * self.world.world_size
        for b in range(self.start_batch, len(self)):
            batch = order[b * global_size : (b + 1) * global_size]
            if self.sort_key is not None:
                batch = sorted(batch, key=lambda index: -self.sort_key[index])
            share, extra = divmod(len(batch), self.world.world_size)
            start = self.world.rank * share + min(self.world.rank, extra)
            yield batch[start : start + share + int(self.world.rank < extra)]


def epoch_loader(dataset: Any, sampler: GlobalBatchSampler, epoch: int, start_batch: int, **kwargs: Any) -> DataLoader:
    """The DataLoader of one epoch from batch `start_batch` on (the dataset's `set_epoch` is called if it has one).

    It draws its worker seeds from its own generator, not from torch's global one, so that dropout draws the same
    numbers whether the run was resumed or not.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler.set_epoch(epoch, start_batch)
    generator = torch.Generator().manual_seed(sampler.seed * 1_000_003 + epoch)
    return DataLoader(dataset, batch_sampler=sampler, generator=generator, **kwargs)


def log_main(message: str) -> None:
    """Print `message` to stderr on rank 0 only."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)
