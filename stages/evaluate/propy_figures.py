"""ProPy's figures from the trained model (`cache/<dataset>/propy/best.pt`) on the evaluated split.

- `propy_attention_<n>.png`, the paper's Figure 4: for an R@1 hit, the selected event prompt's attention over the
  patches of every frame of the retrieved video (frame level; min-max normalised over the event's frames, as the
  official plots) and over the other event prompts of the pyramid (event level; the selected event has a red border,
  the event it attends most an orange one). The corpus is first encoded without attention maps; only the chosen
  videos are then run again with maps, one at a time (the official code keeps every video's maps in memory).
- `propy_selected_events.png`, the paper's Figure 5: for every query, the event that scores best in its
  ground-truth video, by pyramid layer and by length in seconds (beside the ground-truth moments), for the trained
  model and the same model at initialisation (the paper plots it during training).
- `propy_event_map.png`: PCA of event features (coloured by pyramid layer) and query features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.patches import Rectangle
from torch.utils.data import DataLoader

from stages.data.config import BaseConfig
from stages.data.corpus import Corpus, load_corpus
from stages.data.device import autocast_dtype, resolve_device
from stages.data.frame_cache import FrameCache
from stages.data.frame_dataset import FrameDataset
from stages.evaluate.evaluator import encode_batches, ground_truth
from stages.evaluate.metrics import gt_ranks
from stages.evaluate.plotting import blank_figure, new_figure, save
from stages.evaluate.retrieval import ScoringConfig, iter_score_blocks
from stages.models.clip_backbone import normalize_frames
from stages.models.propy import ProPy
from stages.models.trained import PropyEncoder, build_propy, load_trained_propy

FRAMES_PER_ROW = 8


@dataclass(frozen=True)
class PropyFiguresConfig:
    """What ProPy's figures show (the `figures.propy` section)."""

    attention_queries: int = 2  # Figure 4: R@1 hits drawn, one PNG each (highest score first, distinct videos)
    attention_layer: int = -1  # ViT layer whose attention maps are drawn (-1 = last, as the official plots)
    map_points: int = 4000  # event map: at most this many event features (a seeded sample), plus every query
    untrained_reference: bool = True  # Figure 5 also shows the model at initialisation (one more encoding)
    seed: int = 0  # the event map's sample


@dataclass(frozen=True)
class PropyInputs:
    """How ProPy reads its inputs (from the `train_propy` section) and which split is drawn."""

    split: str  # the evaluated split (evaluate.protocol.split)
    max_words: int = 32
    tail_fix: bool = False
    amp: bool = True
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    batch_videos: int = 16
    batch_queries: int = 256


@dataclass(frozen=True)
class Selection:
    """Per query of the split: its rank, the score of its ground-truth video and the best event there."""

    ranks: np.ndarray  # [Nq] 1-based
    gt_scores: np.ndarray  # [Nq]
    gt_event: np.ndarray  # [Nq] index into the pyramid's events (top layer first)


@dataclass(frozen=True)
class Encoded:
    """A model's features of one split."""

    events: torch.Tensor  # [Nv, K, E] on the CPU (K = the MIL events)
    queries: torch.Tensor  # [Nq, E]


def draw_propy_figures(
    base: BaseConfig, cfg: PropyFiguresConfig, inputs: PropyInputs, out: Path, dpi: int
) -> list[Path]:
    """Draw ProPy's figures into `out` (PNG at `dpi`) and return their paths."""
    device = resolve_device(inputs.device)
    if inputs.threads:
        torch.set_num_threads(inputs.threads)
    model, _ = load_trained_propy(base, device)
    corpus = load_corpus(base, inputs.split)
    dataset = FrameDataset(
        FrameCache(base.frames_path), corpus.video_ids, model.pyramid.num_frames, False, inputs.tail_fix
    )
    gt_video, gt_windows = ground_truth(corpus.queries, corpus.video_ids)
    encoded = encode_split(model, dataset, corpus, inputs, device)
    selection = select_events(model, encoded, gt_video, device)
    paths = []
    hits = _chosen_hits(selection, gt_video, cfg.attention_queries)
    for number, query in enumerate(hits, start=1):
        frames, _ = dataset[int(gt_video[query])]
        path = out / f"propy_attention_{number}.png"
        event = int(selection.gt_event[query])
        paths.append(attention_figure(model, frames, corpus, query, event, cfg.attention_layer, path, dpi, device))
    selections = {"trained": selection}
    if cfg.untrained_reference:
        untrained = build_propy(base, model.config, device, clip=(model.clip, model.arch))  # CLIP is frozen
        selections["untrained"] = select_events(
            untrained, encode_split(untrained, dataset, corpus, inputs, device), gt_video, device
        )
    paths.append(selected_events_figure(model, corpus, selections, gt_windows, out / "propy_selected_events.png", dpi))
    paths.append(event_map_figure(model, encoded, cfg, out / "propy_event_map.png", dpi))
    return paths


def encode_split(
    model: ProPy, dataset: FrameDataset, corpus: Corpus, inputs: PropyInputs, device: torch.device
) -> Encoded:
    """Event features of every video and features of every query of the split (no attention maps)."""
    encoder = PropyEncoder(model, device, autocast_dtype(device, inputs.amp), inputs.max_words)
    model.eval()
    texts = [q.query for q in corpus.queries]
    query_batches = [texts[i : i + inputs.batch_queries] for i in range(0, len(texts), inputs.batch_queries)]
    with torch.inference_mode():
        videos = DataLoader(dataset, batch_size=inputs.batch_videos)
        events, _, _ = encode_batches(encoder.encode_videos, videos, torch.device("cpu"), "videos", ndim=3)
        queries, _, _ = encode_batches(encoder.encode_queries, query_batches, torch.device("cpu"), "queries")
    return Encoded(events, queries)


def select_events(model: ProPy, encoded: Encoded, gt_video: torch.Tensor, device: torch.device) -> Selection:
    """Each query's rank, ground-truth score and best event in its ground-truth video, one row block at a time."""
    scoring = ScoringConfig(normalize_units=model.config.normalize_eval, device=str(device))
    ranks, scores, events = [], [], []
    blocks = iter_score_blocks(encoded.queries, encoded.events, scoring, with_best_unit=True, progress=False)
    for rows, block_scores, best_unit in blocks:
        gt = gt_video[rows].to(block_scores.device)
        ranks.append(gt_ranks(block_scores, gt).cpu())
        scores.append(block_scores.gather(1, gt[:, None]).squeeze(1).cpu())
        events.append(model.mil_index[best_unit.gather(1, gt[:, None]).squeeze(1)].cpu())
    return Selection(torch.cat(ranks).numpy(), torch.cat(scores).numpy(), torch.cat(events).numpy())


def _chosen_hits(selection: Selection, gt_video: torch.Tensor, count: int) -> list[int]:
    """R@1 hits, highest ground-truth score first, at most one per video."""
    chosen, videos = [], set()
    for query in np.argsort(-selection.gt_scores, kind="stable"):
        video = int(gt_video[query])
        if selection.ranks[query] == 1 and video not in videos:
            chosen.append(int(query))
            videos.add(video)
        if len(chosen) == count:
            break
    return chosen


# ------------------------------------------------------------------------------------------------------------------
# Figure 4: attention of the selected event prompt
# ------------------------------------------------------------------------------------------------------------------


def attention_maps(
    model: ProPy, frames: torch.Tensor, event: int, layer: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected event's attention at one ViT layer: over patches [Nf, G, G] and over the events [Ne]."""
    with torch.inference_mode():
        _, maps = model.forward_visual(normalize_frames(frames[None].to(device)), need_weights=True)
    row = maps[layer, 0, event].float().cpu()  # [Ne + Nvp + T*Nf], frame tokens token-major (t*Nf + f)
    pyramid, tokens = model.pyramid, model.arch.tokens_per_frame
    ne, nf = pyramid.num_events, pyramid.num_frames
    frame_part = row[-tokens * nf :].view(tokens, nf)[1:]  # CLS excluded
    grid = int(round((tokens - 1) ** 0.5))
    return frame_part.T.reshape(nf, grid, grid), row[:ne]


def attention_figure(
    model: ProPy,
    frames: torch.Tensor,
    corpus: Corpus,
    query: int,
    event: int,
    layer: int,
    path: Path,
    dpi: int,
    device: torch.device,
) -> Path:
    """ProPy Figure 4 for one query: frame-level heatmaps over the retrieved video and the event-level pyramid."""
    patches, event_row = attention_maps(model, frames, event, layer, device)
    pyramid = model.pyramid
    nf, size = pyramid.num_frames, frames.shape[1]
    start, end = (int(v) for v in pyramid.spans[event])
    inside = patches[start:end]
    heat = (patches - inside.min()) / (inside.max() - inside.min()).clamp_min(1e-12)
    heat = F.interpolate(heat[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    q = corpus.queries[query]
    rows = -(-nf // FRAMES_PER_ROW)
    figure = blank_figure((min(nf, FRAMES_PER_ROW) * 1.5, rows * 1.7 + 3.6))
    grid = figure.add_gridspec(rows + 1, min(nf, FRAMES_PER_ROW), height_ratios=[1] * rows + [1.9])
    jet = colormaps["jet"]
    for f in range(nf):
        ax = figure.add_subplot(grid[f // FRAMES_PER_ROW, f % FRAMES_PER_ROW])
        image = frames[f].numpy() / 255.0
        attended = start <= f < end  # frames outside the event's segment are faded: it cannot attend them
        ax.imshow(0.5 * image + 0.5 * jet(heat[f].numpy())[..., :3] if attended else 0.35 * image + 0.65)
        in_moment = any(a < (f + 1) / nf * q.duration and b > f / nf * q.duration for a, b in q.moments)
        ax.set_title(f"frame {f}" + (" (GT)" if in_moment else ""), fontsize=8, color="green" if in_moment else "k")
        ax.set_xticks([])
        ax.set_yticks([])
    tree = figure.add_subplot(grid[rows, :])
    _draw_pyramid(tree, model, event_row.numpy(), event)
    window = f"{start / nf * q.duration:.1f}-{end / nf * q.duration:.1f} s"
    moments = ", ".join(f"{a:.1f}-{b:.1f} s" for a, b in q.moments)
    shown_layer = layer % model.arch.vision_layers + 1
    title = [
        f'"{q.query}"',
        f"video {q.video_id} (retrieved first); selected event {event}: {window}; ground truth {moments}",
        f"ViT layer {shown_layer}: the event prompt's attention over the patches of its frames and over the events",
    ]
    figure.suptitle("\n".join(title), fontsize=9)
    return save(figure, path, dpi)


def _draw_pyramid(ax: Axes, model: ProPy, attention: np.ndarray, selected: int) -> None:
    """The pyramid as rows of boxes (top layer on top), coloured by the selected event's attention to each event."""
    pyramid = model.pyramid
    levels, positions = pyramid.level_of_event, pyramid.index_in_level
    counts = {int(level): int((levels == level).sum()) for level in np.unique(levels)}
    width_total = float(max(counts.values()))
    allowed = attention > 0
    blues = ListedColormap(colormaps["Blues"](np.linspace(0.15, 1.0, 256)))  # the lightest blue stays visible
    norm = Normalize(0.0, float(attention[allowed].max()) if allowed.any() else 1.0)
    others = np.where(np.arange(attention.size) == selected, -np.inf, attention)
    most = int(np.argmax(others))
    for event, (level, position) in enumerate(zip(levels, positions, strict=True)):
        width = width_total / counts[int(level)]
        colour = blues(norm(attention[event])) if allowed[event] else (0.93, 0.93, 0.93)
        edge, line = ("red", 2.5) if event == selected else ("orange", 2.5) if event == most else ("grey", 0.6)
        ax.add_patch(Rectangle((position * width, level - 0.45), width, 0.9, facecolor=colour, edgecolor=edge, lw=line))
    ax.set_xlim(0, width_total)
    ax.set_ylim(0.4, pyramid.num_levels + 0.6)
    spans = pyramid.spans[:, 1] - pyramid.spans[:, 0]
    ax.set_yticks(sorted(counts), [f"layer {k} ({int(spans[levels == k][0])} frames)" for k in sorted(counts)])
    ax.set_xticks([])
    ax.set_xlabel(
        "events of each layer, left to right (red: the selected event; orange: the one it attends most; grey: masked)"
    )
    colourbar = ax.figure.colorbar(ScalarMappable(norm, blues), ax=ax, fraction=0.03, pad=0.01)
    colourbar.set_label("attention of the selected event")


# ------------------------------------------------------------------------------------------------------------------
# Figure 5 and the event map
# ------------------------------------------------------------------------------------------------------------------


def selected_events_figure(
    model: ProPy,
    corpus: Corpus,
    selections: dict[str, Selection],
    gt_windows: list[torch.Tensor],
    path: Path,
    dpi: int,
) -> Path:
    """ProPy Figure 5: the best event of each query in its ground-truth video, by pyramid layer and by length."""
    pyramid = model.pyramid
    durations = np.array([q.duration for q in corpus.queries])
    spans = pyramid.spans
    figure, axes = new_figure(1, 2, (12, 4.3))
    levels = np.arange(1, pyramid.num_levels + 1)
    width = 0.8 / len(selections)
    lengths = {}
    for offset, (name, selection) in enumerate(selections.items()):
        chosen = pyramid.level_of_event[selection.gt_event]
        share = [100.0 * float((chosen == level).mean()) for level in levels]
        axes[0].bar(levels + (offset - (len(selections) - 1) / 2) * width, share, width, label=name)
        frames = spans[selection.gt_event, 1] - spans[selection.gt_event, 0]
        lengths[f"selected event ({name})"] = frames / pyramid.num_frames * durations
    frames_per_level = [int((spans[:, 1] - spans[:, 0])[pyramid.level_of_event == level][0]) for level in levels]
    axes[0].set_xticks(levels, [f"{level}\n({f} frames)" for level, f in zip(levels, frames_per_level, strict=True)])
    axes[0].set_xlabel("pyramid layer of the selected event (event length)")
    axes[0].set_ylabel("queries (%)")
    axes[0].legend()
    moments = [float((w[:, 1] - w[:, 0]).mean()) for w in gt_windows if w.numel()]
    lengths["ground-truth moment"] = np.array(moments)
    top = max(float(values.max()) for values in lengths.values() if values.size)
    bins = np.linspace(0.0, top, 25)
    for name, values in lengths.items():
        axes[1].hist(values, bins=bins, histtype="step", linewidth=1.8, label=name, density=True)
    axes[1].set_xlabel("length (seconds)")
    axes[1].set_ylabel("density")
    axes[1].legend(fontsize=8)
    figure.suptitle(f"Events selected by the MIL max in each query's ground-truth video ({corpus.split} split)")
    return save(figure, path, dpi)


def event_map_figure(model: ProPy, encoded: Encoded, cfg: PropyFiguresConfig, path: Path, dpi: int) -> Path:
    """A 2-D PCA map of the (L2-normalised) event features, coloured by pyramid layer, with the query features."""
    events = F.normalize(encoded.events.float(), dim=-1)
    layer = np.broadcast_to(model.pyramid.level_of_event[model.mil_index.cpu().numpy()], events.shape[:2]).reshape(-1)
    events = events.reshape(-1, events.shape[-1]).numpy()
    rng = np.random.default_rng(cfg.seed)
    keep = np.sort(rng.permutation(len(events))[: cfg.map_points])
    queries = F.normalize(encoded.queries.float(), dim=-1).numpy()
    points = np.concatenate([events[keep], queries])
    centred = points - points.mean(axis=0)
    _, singular, axes_t = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ axes_t[:2].T
    explained = 100.0 * singular[:2] ** 2 / float((singular**2).sum())
    figure, (ax,) = new_figure(1, 1, (7.5, 6.2))
    levels = model.pyramid.num_levels
    cmap = colormaps["viridis"].resampled(levels)
    norm = BoundaryNorm(np.arange(0.5, levels + 1.5), cmap.N)  # one colour per layer, ticks at their centres
    scatter = ax.scatter(*projected[: len(keep)].T, c=layer[keep], cmap=cmap, norm=norm, s=6, alpha=0.6)
    ax.scatter(*projected[len(keep) :].T, c="red", marker="x", s=10, alpha=0.6, label="queries")
    colourbar = figure.colorbar(scatter, ax=ax, ticks=np.arange(1, levels + 1))
    colourbar.set_label("pyramid layer of the event")
    ax.set_xlabel(f"principal component 1 ({explained[0]:.1f} % of the variance)")
    ax.set_ylabel(f"principal component 2 ({explained[1]:.1f} % of the variance)")
    ax.legend(loc="upper right")
    ax.set_title(f"Event features ({len(keep)} of {len(events)}) and query features ({len(queries)}), PCA")
    return save(figure, path, dpi)
