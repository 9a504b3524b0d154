"""CLIP feature extraction: the frozen CLIP over the frames and queries of every available video, into HDF5.

    python pipeline.py features                 # GPU in-process when there is one, else dask worker processes
    python pipeline.py features -s workers=4 -s scheduler_address=tcp://host:8786
    dvc repro features

Writes `cache/<dataset>/clip_<arch>.h5` (see `stages.data.feature_store`): `/video/<id>` [T, E] projected [CLS]
features of every cached frame, `/text/<query_id>` [L, E] last-layer token features SOT..EOT, for the videos `decode`
stored and their queries (the available set, `stages.data.available`). The CLIP is the same weights file that ProPy
uses (`base.clip_weights`). One writer (this process) per file; a re-run skips entries already written, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.data.available import available_queries
from stages.data.config import BaseConfig
from stages.data.corpus import check_cached
from stages.data.device import resolve_device
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStoreInfo, FeatureStoreWriter
from stages.data.frame_cache import FrameCache
from stages.data.progress import progress_bar
from stages.extract.cluster import dask_client
from stages.models.clip_backbone import (
    file_sha256,
    load_clip,
    normalize_frames,
    open_clip_version,
    text_token_features,
    tokenize,
)


@dataclass(frozen=True)
class FeaturesConfig:
    """The `features` section of params.yaml."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one
    batch_frames: int = 256  # frames per CLIP forward
    batch_queries: int = 256  # queries per CLIP forward
    videos_per_task: int = 16  # videos per dask task on CPU
    workers: int = 2  # dask worker processes on CPU (one torch thread each); 0 = in this process
    scheduler_address: str | None = None  # an existing dask scheduler instead of a local cluster
    dtype: Literal["float32", "float16"] = "float32"  # on-disk dtype (float16 halves the store)


def run_features(base: BaseConfig, cfg: FeaturesConfig) -> Path:
    """Extract every missing video and query feature into the store; return its path."""
    model, arch = load_clip(base.clip_weights)
    if arch.name != base.clip_arch:
        raise PipelineError(
            f"{base.clip_weights} holds a CLIP {arch.name} but base.clip_arch is {base.clip_arch!r}; "
            f"set base.clip_arch={arch.name}"
        )
    path = base.features_path()
    info = FeatureStoreInfo(
        model=f"open_clip CLIP {arch.name}",
        weights_sha256=file_sha256(base.clip_weights),
        open_clip_version=open_clip_version(),
        layer="last: video ln_post @ proj of [CLS]; text ln_final @ text_projection of every token",
        normalisation="none",
        arch=arch.name,
    )
    available = available_queries(base)
    available.log("features", "all splits")
    check_cached(base, available)
    cache = FrameCache(base.frames_path)
    queries = available.queries
    video_ids = sorted(available.video_ids)
    size = cache.frame_shape(video_ids[0])[0]  # available_queries refuses an empty set
    if size != arch.image_size:
        raise PipelineError(
            f"cached frames are {size}px but {base.clip_weights} expects {arch.image_size}px; "
            f"set decode.size={arch.image_size} and re-run decode"
        )
    device = resolve_device(cfg.device)
    with FeatureStoreWriter(path, info, dtype=cfg.dtype) as store:
        todo_videos = [v for v in video_ids if not store.has("video", v)]
        todo_queries = [q for q in queries if not store.has("text", q.query_id)]
        with progress_bar(
            total=len(video_ids), initial=len(video_ids) - len(todo_videos), desc="features: videos"
        ) as bar:
            for video_id, features in _video_features(base, cfg, model, cache, todo_videos, device):
                store.write("video", video_id, features)
                bar.update()
        model = model.to(device)
        with progress_bar(
            total=len(queries), initial=len(queries) - len(todo_queries), desc="features: queries"
        ) as bar:
            for start in range(0, len(todo_queries), cfg.batch_queries):
                batch = todo_queries[start : start + cfg.batch_queries]
                for query, features in zip(batch, query_features(model, [q.query for q in batch], device), strict=True):
                    store.write("text", query.query_id, features)
                bar.update(len(batch))
    return path


def _video_features(
    base: BaseConfig,
    cfg: FeaturesConfig,
    model: torch.nn.Module,
    cache: FrameCache,
    video_ids: list[str],
    device: torch.device,
) -> Iterator[tuple[str, np.ndarray]]:
    """(video id, [T, E] features) for every video: `model` in this process on a GPU or with 0 workers, else on
    dask workers that each load the weights file once."""
    if device.type == "cuda" or cfg.workers == 0:
        yield from encode_videos(model.to(device), cache, video_ids, cfg.batch_frames, device)
        return
    from dask.distributed import as_completed

    chunks = [video_ids[i : i + cfg.videos_per_task] for i in range(0, len(video_ids), cfg.videos_per_task)]
    with dask_client(cfg.workers, cfg.scheduler_address) as client:
        futures = [
            client.submit(_encode_chunk, str(base.clip_weights), cache, chunk, cfg.batch_frames, pure=False)
            for chunk in chunks
        ]
        for future in as_completed(futures):
            yield from future.result()


_WORKER_MODELS: dict[str, torch.nn.Module] = {}


def _encode_chunk(weights: str, cache: FrameCache, video_ids: list[str], batch: int) -> list[tuple[str, np.ndarray]]:
    """Dask task: encode a few videos on the CPU with the model loaded once per worker process."""
    torch.set_num_threads(1)
    if weights not in _WORKER_MODELS:
        _WORKER_MODELS[weights] = load_clip(weights)[0]
    return list(encode_videos(_WORKER_MODELS[weights], cache, video_ids, batch, torch.device("cpu")))


@torch.inference_mode()
def encode_videos(
    model: torch.nn.Module, cache: FrameCache, video_ids: list[str], batch: int, device: torch.device
) -> Iterator[tuple[str, np.ndarray]]:
    """Projected [CLS] features of every cached frame of each video, `batch` frames per forward."""
    for video_id in video_ids:
        frames = torch.from_numpy(cache.read(video_id))
        parts = [
            model.encode_image(normalize_frames(frames[i : i + batch].to(device))).float().cpu()
            for i in range(0, len(frames), batch)
        ]
        yield video_id, torch.cat(parts).numpy()


@torch.inference_mode()
def query_features(model: torch.nn.Module, texts: list[str], device: torch.device) -> list[np.ndarray]:
    """[L_i, E] token features SOT..EOT of each text (padding removed), as stored under `/text/<query_id>`."""
    context = model.positional_embedding.shape[0]
    ids = tokenize(texts, max_words=context).to(device)
    tokens = text_token_features(model, ids).float().cpu().numpy()
    lengths = (ids.argmax(dim=1) + 1).tolist()
    return [tokens[i, :length] for i, length in enumerate(lengths)]
