"""AMDNet against the official-code fixture (`python pipeline.py verify-reference amdnet PREFIX`).

    python pipeline.py verify-reference amdnet $PRVR_FIXTURES/baselines_official/amdnet_shared

Checks, as max absolute errors: preprocessing (float32 clip means without normalisation, sentence vectors, batch
orders), the encoder's intermediates (projections, attention blocks and their weights, global vector, interleaved
span anchors, span masks and probe masks, moments), inference scores, the training matrices and the
moment-relevance and span-diversity internals on the official training batch (mapped back to raw order), the losses
weighted and unweighted, and `negatives`: the loss must not depend on the negative-sampling setting and no negative
may be drawn (officially the hard-negative switch changes nothing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from stages.models.baselines.amdnet import AMDNet, AMDNetConfig
from stages.models.baselines.data import QueryBatch, VideoBatch
from stages.models.baselines.layers import gaussian_window
from stages.models.baselines.losses import NegativeSampling, multi_positive_nce
from stages.models.baselines.reference import (
    capture_outputs,
    fixture_model_config,
    load_fixture,
    max_abs_diff,
    max_of,
    preprocessing_errors,
    train_batch,
)
from stages.models.reference import register_reference_check

ENCODER_OUTPUTS = {
    "clip_input_proj": "enc_clip_proj",
    "clip_pos_embed": "enc_clip_posemb",
    "clip_encoder.attn0": "enc_clip_attn0",
    "clip_encoder.attn1": "enc_clip_attn1",
    "clip_encoder.attn0.self.dropout": "attn0_probs",  # the attention weights (dropout is off in eval mode)
    "clip_encoder.attn1.self.dropout": "attn1_probs",
    "clip_encoder.clip2video.layernorm": "video_mean_ln",
    "clip_encoder.fc_gauss": "gauss_logits",
}
VIDEO_COLUMNS = {"clip", "clip_raw", "moment_scores", "global_scores"}  # training outputs with a video axis
SAMPLINGS = (NegativeSampling(hard=False), NegativeSampling(hard=True, pool_size=20), NegativeSampling(True, 1))


def _encoder_errors(model: AMDNet, io: dict[str, np.ndarray]) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Errors of the query and video encoders on the fixture's preprocessed inputs (raw order); also returns the
    query vectors and the encoded clips."""
    num_videos, num_queries = len(io["pre_clip_feats"]), len(io["pre_query_feats"])
    clips = torch.from_numpy(io["pre_clip_feats"])
    videos = VideoBatch([f"v{i}" for i in range(num_videos)], clips, clips[:, :1], torch.ones(num_videos, 1))
    queries = QueryBatch(
        [f"q{i}" for i in range(num_queries)],
        torch.from_numpy(io["pre_query_feats"])[:, None],
        torch.ones(num_queries, 1),
    )
    means: dict[str, torch.Tensor] = {}

    def record_mean(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        means["video_mean"] = inputs[0]

    handle = model.get_submodule("clip_encoder.clip2video.layernorm").register_forward_pre_hook(record_mean)
    try:
        with capture_outputs(model, ENCODER_OUTPUTS) as out:
            parts = model.encode_video_parts(videos)
            query_vecs = model.encode_queries(queries)
    finally:
        handle.remove()
    grid = torch.linspace(0, 1, model.cfg.map_size)
    probes = gaussian_window(
        grid, torch.from_numpy(io["gauss_probe_center"])[:, None], torch.from_numpy(io["gauss_probe_width"])[:, None]
    )
    errors = {
        "query_encoder": max_abs_diff(query_vecs, io["query_vec"]),
        "clip_encoder": max_of(
            [max_abs_diff(out[m], io[k]) for m, k in ENCODER_OUTPUTS.items() if k.startswith("enc_")]
            + [max_abs_diff(parts.clips, io["enc_clip"])]
        ),
        "attention_probs": max_of(max_abs_diff(out[m], io[k]) for m, k in ENCODER_OUTPUTS.items() if "probs" in k),
        "video_global": max_of(
            [
                max_abs_diff(means["video_mean"], io["video_mean"]),
                max_abs_diff(out["clip_encoder.clip2video.layernorm"], io["video_mean_ln"]),
                max_abs_diff(parts.global_vec, io["video_global"]),
            ]
        ),
        "span_anchors": max_of(
            [
                max_abs_diff(out["clip_encoder.fc_gauss"], io["gauss_logits"]),
                max_abs_diff(parts.centres, io["gauss_center"]),
                max_abs_diff(parts.widths, io["gauss_width"]),
            ]
        ),
        "span_masks": max_of(
            [max_abs_diff(parts.masks, io["gmm_masks"]), max_abs_diff(probes, io["gauss_probe_masks"])]
        ),
        "moments": max_abs_diff(parts.moments, io["moment_feats"]),
    }
    return errors, query_vecs, parts.clips


def _inference_errors(model: AMDNet, io: dict[str, np.ndarray], queries: torch.Tensor, clips: torch.Tensor) -> float:
    branches = model.score_branches(queries, clips)
    return max_of(
        [
            max_abs_diff(model.clip_level_scores(queries, clips), io["infer_clip_level_scores"]),
            max_abs_diff(branches["clip"], io["infer_clip_scores"]),
            max_abs_diff(model.score(queries, clips), io["infer_fused_scores"]),
            max_abs_diff(branches["key_clip"], io["infer_key_clip"]),
        ]
    )


def _training_errors(model: AMDNet, config: dict[str, Any], io: dict[str, np.ndarray]) -> dict[str, float]:
    """The training matrices, loss internals and losses on our official-order batch, compared in raw order."""
    batch = train_batch(config, io, model.preprocess_config())
    data = config["data"]
    to_raw_queries = np.argsort([data["query_ids"].index(q) for q in batch.queries.query_ids])
    to_raw_videos = np.argsort([data["video_ids"].index(v) for v in batch.videos.video_ids])
    scores = model.training_scores(batch)

    def raw(name: str) -> torch.Tensor:
        value = scores[name]
        if name.startswith("div_"):  # per video
            return value[to_raw_videos]
        value = value[to_raw_queries]  # per query, and per (query, video) for the score matrices
        return value[:, to_raw_videos] if name in VIDEO_COLUMNS else value

    moment_max, moment_argmax = raw("moment_scores").max(dim=-1)
    losses, _ = model(batch, SAMPLINGS[0])
    sampled = []
    for sampling in SAMPLINGS:
        total, negatives = model(batch, sampling, torch.Generator().manual_seed(0))
        sampled.append(float(len(negatives)) or abs(float(total["total"]) - float(losses["total"])))
    return {
        "train_scores": max_of(
            [
                max_abs_diff(raw("clip"), io["train_clip_scores"]),
                max_abs_diff(raw("clip_raw"), io["train_clip_scores_raw"]),
                max_abs_diff(raw("rel_query_vec"), io["train_query_vec"]),
            ]
        ),
        "moment_relevance": max_of(
            [
                max_abs_diff(raw("moment_scores"), io["train_moment_scores"]),
                max_abs_diff(moment_max, io["train_moment_max"]),
                max_abs_diff(moment_argmax, io["train_moment_argmax"]),
                max_abs_diff(raw("global_scores"), io["train_global_scores"]),
                max_abs_diff(raw("rel_hinge"), io["rel_hinge"]),
            ]
        ),
        "span_diversity": max_of(
            [max_abs_diff(raw("div_gram"), io["div_gram"]), max_abs_diff(raw("div_per_video"), io["div_per_video"])]
        ),
        "losses": max_of(
            [max_abs_diff(losses[name], io[f"loss_{name}"]) for name in ("clip_nce", "div", "rel", "total")]
            + [
                max_abs_diff(
                    multi_positive_nce(scores["clip_raw"], batch.queries.labels), io["loss_clip_nce_unweighted"]
                ),
                max_abs_diff(scores["div_per_video"].mean(), io["loss_div_unweighted"]),
                max_abs_diff(scores["rel_hinge"].mean(), io["loss_rel_unweighted"]),
            ]
        ),
        "negatives": max_of(sampled),
    }


def amdnet_config(config: dict[str, Any]) -> AMDNetConfig:
    """Our config of the AMDNet a fixture was made with."""
    return fixture_model_config(AMDNetConfig, config)


@register_reference_check("amdnet", fixture_config=amdnet_config)
def check_amdnet(prefix: str) -> dict[str, float]:
    """AMDNet against `PREFIX_*`: preprocessing, encoder internals, scores, loss internals, losses, negatives."""
    config, io, state = load_fixture(prefix)
    model = AMDNet(amdnet_config(config))
    model.load_state_dict(state, strict=True)
    model.eval()
    errors = preprocessing_errors(config, io, model.preprocess_config())
    with torch.no_grad():
        encoder_errors, queries, clips = _encoder_errors(model, io)
        errors |= encoder_errors
        errors["inference_scores"] = _inference_errors(model, io, queries, clips)
        errors |= _training_errors(model, config, io)
    return errors
