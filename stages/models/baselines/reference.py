"""Reference checks of the MS-SL family against fixtures of the official code (`PREFIX_{official_state_dict.pt,
config.json,io.npz}`, format in the fixtures folder's `baselines_official/README.md`).

    python pipeline.py verify-reference msl $PRVR_FIXTURES/baselines_official/mssl_shared
    python pipeline.py verify-reference gmmformer $PRVR_FIXTURES/baselines_official/gmmformer_shared

This module holds what every check shares; each model's check is `<model>_reference.py` beside it. A check builds
our model from the fixture's config, loads the official state dict (identity key mapping, strict),
runs our preprocessing, datasets and collate on the raw features, our encoders and scores on the preprocessed inputs
(raw order), and our losses on the official training batch with the recorded negative ranks. It returns one max
absolute error per group; integer outputs (bins, orders, key clips) count their absolute index differences.
Negatives are compared by the score at the chosen index, because tied candidates are equally valid.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.data.errors import PipelineError
from stages.data.schema import Query
from stages.models.baselines.base import BaselineConfig, BaselineModel
from stages.models.baselines.data import (
    FeatureSource,
    QueryBatch,
    QueryDataset,
    TrainBatch,
    VideoBatch,
    VideoDataset,
    VideoQueryDataset,
    collate_queries,
    collate_train,
    collate_videos,
)
from stages.models.baselines.importer import official_state_dict
from stages.models.baselines.layers import gaussian_mask
from stages.models.baselines.losses import NegativeSampling
from stages.models.baselines.preprocessing import PreprocessConfig, bin_edges, bin_ranges, frame_ranges

LOSS_MODES = ("hardest", "random", "hardpool")
Fixture = tuple[dict[str, Any], dict[str, np.ndarray], dict[str, torch.Tensor]]


def load_fixture(prefix: str) -> Fixture:
    """(config, io arrays, official state dict) of the fixture `prefix`."""
    paths = {name: Path(f"{prefix}_{name}") for name in ("config.json", "io.npz", "official_state_dict.pt")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise PipelineError(f"fixture files missing: {missing}")
    config = json.loads(paths["config.json"].read_text())
    with np.load(paths["io.npz"]) as npz:
        arrays = {key: npz[key] for key in npz.files}
    state = official_state_dict(torch.load(paths["official_state_dict.pt"], map_location="cpu", weights_only=True))
    return config, arrays, state


def fixture_model_config(
    cls: type[BaselineConfig],
    config: dict[str, Any],
    renames: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    derived: Callable[[Any], dict[str, Any]] | None = None,
) -> Any:
    """Our model config from a fixture's `model_config`, `loss_config` and `inference` sections.

    `model_config` entries that our config derives (head size, proposal count, layer widths, block lengths, and
    those `derived(cfg)` returns) must agree with it.

    Args:
        cls: our config dataclass.
        config: the fixture's config.json.
        renames: fixture key -> our field name, for keys named differently (the fixture key is then not ours).
        extra: further field values (e.g. taken from the fixture's `preprocessing` section).
        derived: the model's own derived entries of a config.
    """
    renames = renames or {}
    sections = {**config["model_config"], **config["loss_config"], **config["inference"]}
    sections = {renames.get(key, key): value for key, value in sections.items() if key not in renames.values()}
    known = {name for name in cls.__dataclass_fields__}
    values = {key: tuple(v) if isinstance(v, list) else v for key, v in sections.items() if key in known}
    cfg = cls(**values, **(extra or {}))
    model_config = config["model_config"]
    dim = cfg.hidden_size
    expected = {
        "attention_head_size": dim // cfg.n_heads,
        "num_proposals": cfg.map_size * (cfg.map_size + 1) // 2,
        "gmm_blocks_per_branch": 2,
        "ffn_size": 4 * dim,
        "cross_attention_ffn_size": dim,
        "cross_attn_ffn_size": dim,
        "clip_block_fixed_len": cfg.map_size,
        "frame_block_fixed_len": cfg.max_ctx_l,
        "clip_len": cfg.map_size,
        "frame_len": cfg.max_ctx_l,
        **(derived(cfg) if derived else {}),
    }
    for key, value in expected.items():
        if key in model_config and model_config[key] != value:
            raise PipelineError(f"fixture config: {key} = {model_config[key]} is not supported (ours: {value})")
    return cfg


def fixture_preprocess_config(model: BaselineModel, config: dict[str, Any]) -> PreprocessConfig:
    """The model's preprocessing with the fixture's l2 eps."""
    return dataclasses.replace(model.preprocess_config(), l2_eps=config["preprocessing"]["l2_eps"])


def max_of(errors: Iterable[float]) -> float:
    return float(max(errors, default=0.0))


def max_abs_diff(ours: torch.Tensor | np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    ours_np = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    if ours_np.shape != ref.shape:
        raise PipelineError(f"shape mismatch: ours {ours_np.shape}, fixture {ref.shape}")
    delta = np.abs(ours_np.astype(np.float64) - ref.astype(np.float64))
    if mask is not None:
        delta = delta * mask.reshape(mask.shape + (1,) * (delta.ndim - mask.ndim))
    return float(delta.max()) if delta.size else 0.0


@contextmanager
def capture_outputs(model: nn.Module, names: Iterable[str], inputs: bool = False) -> Any:
    """Record the output (with `inputs`: the first positional input) of the named submodules (the last call of
    each) while the context is open."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_module: nn.Module, args: Any, output: torch.Tensor, name: str = name) -> None:
            outputs[name] = args[0] if inputs else output

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _ragged(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(counts)[:-1])


def raw_videos(io: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The fixture's raw frame features [T, d_v] of each video, in raw order."""
    return _ragged(io["raw_video_feats"], io["raw_video_num_frames"])


def raw_sources(config: dict[str, Any], io: dict[str, np.ndarray]) -> tuple[FeatureSource, FeatureSource]:
    """The fixture's raw video and text features by id; a fixture without token counts stores one sentence vector
    per query, read as a one-row array."""
    data = config["data"]
    videos = dict(zip(data["video_ids"], raw_videos(io), strict=True))
    counts = io.get("raw_query_num_tokens", np.ones(len(data["query_ids"]), dtype=np.int64))
    texts = dict(zip(data["query_ids"], _ragged(io["raw_query_feats"], counts), strict=True))
    return videos, texts


def _bin_errors(videos: FeatureSource, io: dict[str, np.ndarray], cfg: PreprocessConfig) -> float:
    """The family's clip and frame bins of the fixture videos and of its bin tables (`bins_*`: frame tables use the
    frame path, the others the clip path's float32 edges)."""
    lengths = [len(frames) for frames in videos.values()]
    bins = []
    if "pre_clip_bins" in io:
        clip_bins = np.stack([bin_ranges(bin_edges(t, cfg.map_size)) for t in lengths])
        bins.append(max_abs_diff(clip_bins, io["pre_clip_bins"]))
    if "pre_frame_bins" in io:
        bins.append(max_abs_diff(np.stack([frame_ranges(t, cfg) for t in lengths]), io["pre_frame_bins"]))
    for key in (k for k in io if k.startswith("bins_") and not k.endswith("_T")):
        size = int(key.split("_")[-1][1:])
        table = [
            frame_ranges(int(t), PreprocessConfig(max_ctx_l=size))
            if "frame" in key
            else bin_ranges(bin_edges(int(t), size))
            for t in io[f"{key}_T"]
        ]
        bins.append(max_abs_diff(np.stack(table), io[key]))
    return max_of(bins)


def preprocessing_errors(config: dict[str, Any], io: dict[str, np.ndarray], cfg: PreprocessConfig) -> dict[str, float]:
    """Bins, preprocessed inputs and batch orders from the raw features through our datasets and collates.

    Arrays the fixture does not have are not compared (a fixture of sentence vectors has `pre_query_feats`
    [N_q, d_t] and no query mask).
    """
    data = config["data"]
    video_ids, query_ids = data["video_ids"], data["query_ids"]
    videos, texts = raw_sources(config, io)
    eval_videos = collate_videos([item for item in VideoDataset(video_ids, videos, cfg)])
    eval_queries = collate_queries(list(QueryDataset(query_ids, texts, cfg)), sort_by_length=True)
    row_of = [query_ids.index(qid) for qid in eval_queries.query_ids]
    restore = np.argsort(row_of)
    query_feats = eval_queries.last_tokens() if io["pre_query_feats"].ndim == 2 else eval_queries.query_feats
    ours = {
        "pre_clip_feats": eval_videos.clip_feats,
        "pre_frame_feats": eval_videos.frame_feats,
        "pre_frame_mask": eval_videos.frame_mask,
        "pre_query_feats": query_feats[restore],
        "pre_query_mask": eval_queries.query_mask[restore],
    }
    if eval_videos.clip_sizes is not None:
        ours |= {"pre_merge_size": eval_videos.clip_sizes, "pre_merged_frame_label": eval_videos.frame_labels}
    inputs = [max_abs_diff(value, io[key]) for key, value in ours.items() if key in io]
    train = train_batch(config, io, cfg)
    orders = [
        max_abs_diff(np.array(row_of), io["order_eval_queries"]),
        max_abs_diff(np.array([video_ids.index(v) for v in train.videos.video_ids]), io["order_train_videos"]),
        max_abs_diff(np.array([query_ids.index(q) for q in train.queries.query_ids]), io["order_train_queries"]),
    ]
    if "order_eval_videos" in io:
        eval_order = np.array([video_ids.index(v) for v in eval_videos.video_ids])
        orders.append(max_abs_diff(eval_order, io["order_eval_videos"]))
    return {
        "preprocess_bins": _bin_errors(videos, io, cfg),
        "preprocess_inputs": max_of(inputs),
        "batch_orders": max_of(orders),
    }


def train_batch(config: dict[str, Any], io: dict[str, np.ndarray], cfg: PreprocessConfig) -> Any:
    """The official training batch (all videos, all queries) built by our dataset and collate."""
    data = config["data"]
    videos, texts = raw_sources(config, io)
    queries = [
        Query(qid, "fixture", data["video_ids"][vi], 1.0, (), "train")
        for qid, vi in zip(data["query_ids"], data["query_video"], strict=True)
    ]
    dataset = VideoQueryDataset(queries, videos, texts, cfg)
    return collate_train([dataset[i] for i in range(len(dataset))])


def fixture_batches(io: dict[str, np.ndarray], n_videos: int, n_queries: int) -> tuple[VideoBatch, QueryBatch]:
    def t(key: str) -> torch.Tensor:
        return torch.from_numpy(io[key])

    merged = {}
    if "pre_merge_size" in io:
        merged = {"clip_sizes": t("pre_merge_size"), "frame_labels": t("pre_merged_frame_label")}
    videos = VideoBatch(
        [f"v{i}" for i in range(n_videos)], t("pre_clip_feats"), t("pre_frame_feats"), t("pre_frame_mask"), **merged
    )
    queries = QueryBatch(
        [f"q{i}" for i in range(n_queries)], t("pre_query_feats"), t("pre_query_mask"), t("query_video")
    )
    return videos, queries


def fixture_sub_batch(io: dict[str, np.ndarray]) -> VideoBatch:
    """The fixture's sub-batch of videos (`sub_videos`, with their own padded frames `sub_frame_*`)."""
    sub = io["sub_videos"]
    return VideoBatch(
        [f"v{i}" for i in sub],
        torch.from_numpy(io["pre_clip_feats"][sub]),
        torch.from_numpy(io["sub_frame_feats"]),
        torch.from_numpy(io["sub_frame_mask"]),
    )


def _encoder_errors(
    model: BaselineModel,
    io: dict[str, np.ndarray],
    groups: dict[str, list[tuple[str, str]]],
    videos: VideoBatch,
    queries: QueryBatch,
) -> tuple[dict[str, float], torch.Tensor, Any]:
    """Errors of captured module outputs, grouped; also returns the query vectors and video representations."""
    masks = {"query": io["pre_query_mask"], "frame": io["pre_frame_mask"], "clip": None}
    modules = [module for group in groups.values() for module, _ in group]
    with capture_outputs(model, modules) as out:
        query_vecs = model.encode_queries(queries)
        encoded = model.encode_videos(videos)
    errors = {}
    for group, pairs in groups.items():
        errors[group] = max_of(max_abs_diff(out[module], io[key], masks[group.split("_")[0]]) for module, key in pairs)
    return errors, query_vecs, encoded


def _loss_errors(
    model: BaselineModel, config: dict[str, Any], io: dict[str, np.ndarray], negative_keys: dict[str, str]
) -> dict[str, float]:
    """Loss terms of each hard-negative mode on our official-order batch, and the scores at the chosen negatives.

    `negative_keys` maps a negative name (`*_t2v`: query -> video, `*_v2t`: video -> query, `*_row` / `*_col`: query
    -> query along a row / column) to its score matrix. Ranks are injected (permuted to the batch order) except in
    the deterministic `hardest` mode, where our own sampler chooses.
    """
    data = config["data"]
    batch = train_batch(config, io, fixture_preprocess_config(model, config))
    video_order = np.array([data["video_ids"].index(v) for v in batch.videos.video_ids])
    query_order = np.array([data["query_ids"].index(q) for q in batch.queries.query_ids])
    errors: dict[str, float] = {}
    negative_errors = []
    for mode in LOSS_MODES:
        spec = config["loss_modes"][mode]
        sampling = NegativeSampling(spec["use_hard_negative"], spec["hard_pool_size"])
        anchor_orders = {name: video_order if name.endswith("v2t") else query_order for name in negative_keys}
        ranks = None
        if mode != "hardest":
            ranks = {name: torch.from_numpy(io[f"rank_{mode}_{name}"][order]) for name, order in anchor_orders.items()}
        losses, negatives = model(batch, sampling, ranks=ranks)
        errors[f"loss_{mode}"] = max_of(
            max_abs_diff(value, io[f"loss_{mode}_{name}"])
            for name, value in losses.items()
            if f"loss_{mode}_{name}" in io
        )
        for name, matrix in negative_keys.items():
            anchors = anchor_orders[name]
            targets = (video_order if name.endswith("t2v") else query_order)[negatives[name].numpy()]
            scores = io[matrix].T if name.endswith(("v2t", "col")) else io[matrix]
            official = io[f"neg_{mode}_{name}"][anchors]
            negative_errors.append(float(np.abs(scores[anchors, targets] - scores[anchors, official]).max()))
    errors["negatives"] = max_of(negative_errors)
    return errors


def check_fixture(
    prefix: str,
    build: Callable[[dict[str, Any]], BaselineModel],
    encoder_groups: dict[str, list[tuple[str, str]]],
    extra: Callable[[BaselineModel, dict[str, np.ndarray], torch.Tensor, Any, dict[str, float]], None],
    negative_keys: dict[str, str],
) -> dict[str, float]:
    config, io, state = load_fixture(prefix)
    model = build(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    errors = preprocessing_errors(config, io, fixture_preprocess_config(model, config))
    videos, queries = fixture_batches(io, len(config["data"]["video_ids"]), len(config["data"]["query_ids"]))
    with torch.no_grad():
        encoder_errors, query_vecs, encoded = _encoder_errors(model, io, encoder_groups, videos, queries)
        errors |= encoder_errors
        errors["query_encoder"] = max(errors["query_encoder"], max_abs_diff(query_vecs, io["query_vec"]))
        branches = model.score_branches(query_vecs, encoded)
        errors["inference_scores"] = max_of(
            [max_abs_diff(branches[b], io[f"infer_{b}_scores"]) for b in ("clip", "frame")]
            + [max_abs_diff(model.score(query_vecs, encoded), io["infer_fused_scores"])]
            + [max_abs_diff(branches["key_clip"], io["infer_key_clip"])]
        )
        extra(model, io, query_vecs, encoded, errors)
        errors |= _loss_errors(model, config, io, negative_keys)
    return errors


def gaussian_mask_errors(io: dict[str, np.ndarray]) -> float:
    """Our Gaussian masks against every `gauss_L{L}_w{w}` array of the fixture (`0p5` stands for 0.5)."""
    errors = []
    for key in (k for k in io if k.startswith("gauss_")):
        length, width = key.split("_")[1:]
        errors.append(max_abs_diff(gaussian_mask(int(length[1:]), float(width[1:].replace("p", "."))), io[key]))
    return max_of(errors)


def fixture_training_scores(
    model: BaselineModel, io: dict[str, np.ndarray]
) -> tuple[dict[str, torch.Tensor], QueryBatch]:
    """The model's training outputs on the fixture's preprocessed inputs (raw order), and the query batch."""
    videos, queries = fixture_batches(io, io["pre_clip_feats"].shape[0], io["pre_query_feats"].shape[0])
    return model.training_scores(TrainBatch(videos, queries)), queries


def score_errors(scores: dict[str, torch.Tensor], io: dict[str, np.ndarray], names: dict[str, str]) -> float:
    """Training outputs against the fixture arrays that `names` maps them to."""
    return max_of(max_abs_diff(scores[ours], io[ref]) for ours, ref in names.items())


def train_score_errors(model: BaselineModel, io: dict[str, np.ndarray], names: dict[str, str]) -> float:
    """The model's training outputs on the fixture's inputs against the fixture arrays `names` maps them to."""
    return score_errors(fixture_training_scores(model, io)[0], io, names)


# The query pathway's modules and the fixture arrays of their outputs, the same in every model of the family.
QUERY_ENCODER_STAGES = [
    ("query_input_proj", "enc_query_proj"),
    ("query_pos_embed", "enc_query_posemb"),
    ("query_encoder", "enc_query_tokens"),
]

# Models whose frame branch is scored like the clip branch, on the [N_q, N_v] matrix (GMMFormer and its descendants):
# our training matrices and the fixture arrays they must match, and the triplets' negatives with their score matrix.
VIDEO_BRANCH_TRAIN_SCORES = {
    "clip": "train_clip_scores",
    "clip_raw": "train_clip_scores_raw",
    "frame": "train_frame_scores",
    "frame_raw": "train_frame_scores_raw",
    "query_vec": "train_query_vec",
}
VIDEO_BRANCH_NEGATIVES = {
    "clip_t2v": "train_clip_scores",
    "clip_v2t": "train_clip_scores",
    "frame_t2v": "train_frame_scores",
    "frame_v2t": "train_frame_scores",
}
