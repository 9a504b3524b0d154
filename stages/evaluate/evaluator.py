"""Model-agnostic evaluation: encode the corpus once, score in chunks, return PRVR, moment and efficiency metrics.

Every model, ours or imported, is scored by this code through the `RetrievalEncoder` protocol; nothing here imports
a model. The stage code builds the batches, the ground truth and the encoder, then:

    gt_video, gt_windows = ground_truth(queries, video_ids)
    metrics = evaluate_encoder(encoder, video_batches, query_batches, gt_video, EvalConfig(split="test"),
                               durations=durations, gt_windows=gt_windows, module=model)
    write_metrics(base.dataset_metrics / f"{model_name}.json", metrics)

The metrics file holds R1, R5, R10, R100, SumR, MedR, MeanR at its top level, their bootstrap intervals under `ci`,
every query's rank under `ranks` (in query order, with `ground_truth_sha256` naming the queries, so that two models
can be compared query by query), `moments` ("0.5-r10", ...) when the encoder localises, `efficiency` when asked, and
the split, query and video counts the numbers come from.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from stages.data.errors import PipelineError
from stages.data.files import atomic_write_text
from stages.data.progress import progress_bar
from stages.data.schema import Query
from stages.evaluate.efficiency import EfficiencyConfig, bytes_per_video, parameter_counts, probe_latency
from stages.evaluate.metrics import BootstrapConfig, ground_truth_digest, prvr_metrics_from_ranks
from stages.evaluate.moments import MomentConfig, moment_hit_counts, predict_moments
from stages.evaluate.retrieval import ScoreFn, ScoringConfig, rank_ground_truth, resolve_device

SIGNIFICANT_DIGITS = 6


@runtime_checkable
class RetrievalEncoder(Protocol):
    """What evaluation needs from a model.

    Optional attributes, read when present:
        unit_windows: [K, 2] normalised [start, end] window of each video unit (enables moment retrieval).
        score_fn: (queries [q, E], videos [v, K, E]) -> [q, v], when the similarity is not a max-over-units cosine.
    """

    def encode_videos(self, batch: Any) -> Tensor:
        """[b, K, E] unit embeddings of a batch of videos (K fixed for the whole corpus)."""
        ...

    def encode_queries(self, batch: Any) -> Tensor:
        """[q, E] embeddings of a batch of queries."""
        ...


@dataclass(frozen=True)
class EvalConfig:
    """How a model is evaluated."""

    split: str = "test"  # the annotation split the numbers come from (written into the metrics)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)  # intervals over queries
    moment_retrieval: bool = True  # score weakly supervised moments when the encoder has unit windows
    moments: MomentConfig = field(default_factory=MomentConfig)
    measure_efficiency: bool = True  # parameters, storage per video and per-query latency
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` section of params.yaml: the protocol every model is evaluated with."""

    protocol: EvalConfig = field(default_factory=EvalConfig)  # `protocol.split` is the headline split
    also_splits: tuple[str, ...] = ("val",)  # further splits, reported under `splits` (PRVR and moments)
    untrained_reference: bool = True  # also report the model before training (under `untrained`)
    batch_videos: int = 16  # videos per forward pass
    batch_queries: int = 256  # queries per forward pass
    threads: int = 0  # torch CPU threads of a baseline's evaluation (0 = default; ProPy's: train_propy.threads)


def ground_truth(queries: Sequence[Query], video_ids: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """Each query's ground-truth video index in `video_ids` ([Nq] int64) and its moments ([n, 2] seconds)."""
    column = {video_id: index for index, video_id in enumerate(video_ids)}
    missing = [q for q in queries if q.video_id not in column]
    if missing:
        raise PipelineError(
            f"query {missing[0].query_id!r} refers to video {missing[0].video_id!r}, which is not in the evaluated "
            f"corpus ({len(missing)} such queries); evaluate the split its videos belong to"
        )
    gt_video = torch.tensor([column[q.video_id] for q in queries], dtype=torch.long)
    windows = [torch.tensor(q.moments, dtype=torch.float64).reshape(-1, 2) for q in queries]
    return gt_video, windows


def evaluate_encoder(
    encoder: RetrievalEncoder,
    video_batches: Iterable[Any],
    query_batches: Iterable[Any],
    gt_video: Tensor,
    config: EvalConfig,
    durations: Tensor | None = None,
    gt_windows: Sequence[Tensor] | None = None,
    module: nn.Module | None = None,
) -> dict[str, Any]:
    """Evaluate one model on one split.

    Args:
        encoder: the model behind the `RetrievalEncoder` protocol.
        video_batches: batches for `encode_videos`, in corpus order.
        query_batches: batches for `encode_queries`, in query order.
        gt_video: [Nq] corpus index of each query's ground-truth video.
        config: split, scoring, moment and efficiency settings.
        durations: [Nv] video durations in seconds (needed for moments).
        gt_windows: per query, [n, 2] ground-truth moments in seconds (needed for moments; queries without any
            are left out of the moment recalls).
        module: the model's nn.Module, for parameter counts (defaults to the encoder if it is one).

    Returns:
        The metrics dict (see the module docstring).
    """
    module = module if module is not None else encoder if isinstance(encoder, nn.Module) else None
    device = resolve_device(config.scoring.device)
    score_fn: ScoreFn | None = getattr(encoder, "score_fn", None)
    with _eval_mode(encoder), torch.inference_mode():
        videos, _, _ = encode_batches(encoder.encode_videos, video_batches, device, "videos", ndim=3)
        queries, first_batch, first_batch_size = encode_batches(
            encoder.encode_queries, query_batches, device, "queries"
        )
        gt_video = torch.as_tensor(gt_video, dtype=torch.long).reshape(-1)
        if gt_video.shape[0] != queries.shape[0]:
            raise PipelineError(f"{gt_video.shape[0]} ground-truth videos given for {queries.shape[0]} encoded queries")
        ranks = rank_ground_truth(queries, videos, gt_video, config.scoring, score_fn)
        metrics: dict[str, Any] = {
            "split": config.split,
            "num_queries": queries.shape[0],
            "num_videos": videos.shape[0],
            **prvr_metrics_from_ranks(ranks, config.bootstrap),
            "ranks": ranks.tolist(),
            "ground_truth_sha256": ground_truth_digest(gt_video, videos.shape[0]),
        }
        windows = getattr(encoder, "unit_windows", None)
        if config.moment_retrieval and windows is not None and durations is not None and gt_windows is not None:
            metrics["moments"] = _moment_metrics(queries, videos, windows, durations, gt_video, gt_windows, config)
        if config.measure_efficiency:
            encode_first_batch = functools.partial(encoder.encode_queries, first_batch)
            metrics["efficiency"] = _efficiency(
                module, queries[:first_batch_size], videos, encode_first_batch, score_fn, config
            )
    return metrics


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a metrics dict as JSON atomically: sorted keys, floats rounded to 6 significant digits, and lists of
    numbers (intervals, per-query ranks) on one line."""
    try:
        text = _json(_rounded(metrics))
    except ValueError as exc:
        raise PipelineError(f"metrics for {path} hold a NaN or infinite value: {exc}") from exc
    atomic_write_text(path, text + "\n")


def _json(value: Any, indent: str = "") -> str:
    """Indented JSON with sorted keys in which a list of scalars stays on one line."""
    if isinstance(value, dict) and value:
        inner = indent + "  "
        items = (f"{inner}{json.dumps(str(k))}: {_json(v, inner)}" for k, v in sorted(value.items()))
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + _json(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, allow_nan=False)


def _moment_metrics(
    queries: Tensor,
    videos: Tensor,
    windows: Tensor,
    durations: Tensor,
    gt_video: Tensor,
    gt_windows: Sequence[Tensor],
    config: EvalConfig,
) -> dict[str, Any]:
    """Moment recalls over the queries that have ground-truth moments."""
    if len(gt_windows) != queries.shape[0]:
        raise PipelineError(f"{len(gt_windows)} ground-truth window lists given for {queries.shape[0]} queries")
    scored = [i for i, w in enumerate(gt_windows) if w.numel() > 0]
    if not scored:
        return {"num_queries": 0}
    hits: dict[str, int] = {}
    chunk = _moment_chunk(config)  # every query's predictions at once would take Nq x max_per_query x 48 bytes
    for start in range(0, len(scored), chunk):
        rows = scored[start : start + chunk]
        index = torch.tensor(rows, dtype=torch.long)
        predictions = predict_moments(
            queries[index.to(queries.device)], videos, windows, durations, config.moments, config.scoring
        )
        counts = moment_hit_counts(predictions, gt_video[index], [gt_windows[i] for i in rows], config.moments)
        hits = {key: hits.get(key, 0) + count for key, count in counts.items()}
    return {"num_queries": len(scored), **{key: 100.0 * count / len(scored) for key, count in hits.items()}}


def _moment_chunk(config: EvalConfig) -> int:
    """Queries whose moment predictions (`max_per_query` of video, start, end, score and indices, about 48 bytes
    each, on the CPU) fill a quarter of the scoring memory budget."""
    per_query = 48 * config.moments.max_per_query
    return max(1, int(config.scoring.memory_budget_mb * 2**20 / 4 // per_query))


def _efficiency(
    module: nn.Module | None,
    query_batch: Tensor,
    videos: Tensor,
    encode_query_batch: Callable[[], Tensor],
    score_fn: ScoreFn | None,
    config: EvalConfig,
) -> dict[str, Any]:
    """Storage per video, parameters (given a module) and the latency probe (given corpus sizes)."""
    efficiency: dict[str, Any] = {"bytes_per_video": bytes_per_video(videos.shape[1:], videos.dtype)}
    if module is not None:
        efficiency.update(parameter_counts(module))
    if config.efficiency.corpus_sizes:
        video_shape = tuple(videos.shape[1:])
        efficiency.update(
            probe_latency(
                query_batch, video_shape, videos.dtype, config.efficiency, config.scoring, score_fn, encode_query_batch
            )
        )
    return efficiency


def encode_batches(
    encode: Callable[[Any], Tensor], batches: Iterable[Any], device: torch.device, what: str, ndim: int = 2
) -> tuple[Tensor, Any, int]:
    """The encoder's outputs over all batches as one tensor on `device`, the first batch and its size.

    Every batch must give the same per-item shape. When the number of batches is known (a DataLoader, a list), the
    outputs go into one buffer sized from the first batch, so the corpus is never held twice (a list, then its cat).
    """
    count = len(batches) if isinstance(batches, Sized) else 0
    parts: list[Tensor] = []
    buffer, filled = None, 0
    first_batch, first_size, item_shape = None, 0, None
    for number, batch in enumerate(progress_bar(batches, desc=f"encoding {what}", unit="batch", leave=False)):
        output = encode(batch)
        if not isinstance(output, Tensor) or output.ndim != ndim:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise PipelineError(f"encoding {what}: batch #{number} gave {shape}, expected a {ndim}-D tensor")
        if item_shape is None:
            first_batch, first_size, item_shape = batch, output.shape[0], output.shape[1:]
            if count:
                buffer = output.new_empty((count * first_size, *item_shape), device=device)
        elif output.shape[1:] != item_shape:
            raise PipelineError(
                f"encoding {what}: batch #{number} gave per-item shape {tuple(output.shape[1:])}, earlier batches "
                f"{tuple(item_shape)}; pad to one fixed shape"
            )
        if buffer is not None and not parts and filled + output.shape[0] <= buffer.shape[0]:
            buffer[filled : filled + output.shape[0]] = output
            filled += output.shape[0]
        else:
            parts.append(output.to(device))
    if item_shape is None:
        raise PipelineError(f"no {what} to evaluate: the batch iterable was empty")
    head = [] if buffer is None else [buffer[:filled]]
    return (head[0] if not parts else torch.cat([*head, *parts])), first_batch, first_size


@contextlib.contextmanager
def _eval_mode(encoder: Any) -> Iterator[None]:
    """Put an nn.Module encoder in eval mode for the block and restore its training flag afterwards."""
    if not isinstance(encoder, nn.Module):
        yield
        return
    was_training = encoder.training
    encoder.eval()
    try:
        yield
    finally:
        encoder.train(was_training)


def _rounded(value: Any) -> Any:
    """Floats of a nested structure rounded to SIGNIFICANT_DIGITS significant digits."""
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return value
        return round(value, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(value))))
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value
