"""GMMFormer v2 against the official-code fixture (`python pipeline.py verify-reference gmmformer2 PREFIX`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.models.baselines.data import VideoBatch
from stages.models.baselines.gmmformer2 import GMMFormer2, GMMFormer2Config, GMMFormer2Videos
from stages.models.baselines.losses import clip_assignment, clip_assignment_loss, focal_query_diverse_loss
from stages.models.baselines.reference import (
    QUERY_ENCODER_STAGES,
    VIDEO_BRANCH_NEGATIVES,
    VIDEO_BRANCH_TRAIN_SCORES,
    capture_outputs,
    check_fixture,
    fixture_batches,
    fixture_model_config,
    fixture_sub_batch,
    fixture_training_scores,
    gaussian_mask_errors,
    max_abs_diff,
    max_of,
    score_errors,
)
from stages.models.reference import register_reference_check

DYGMM_BLOCKS = {"clip": "clip_encoder", "frame": "frame_encoder_1"}


def video_encoder_groups(frame_branches: range | tuple[int, ...] = range(8)) -> dict[str, list[tuple[str, str]]]:
    """The clip and frame pathways' modules and fixture arrays (`frame_branches`: the frame branches kept)."""
    return {
        "clip_encoder": [
            ("clip_input_proj", "enc_clip_proj"),
            ("clip_pos_embed", "enc_clip_posemb"),
            ("clip_encoder", "enc_clip"),
        ]
        + [(f"clip_encoder.attn{k}", f"gmm_clip_attn{k}") for k in range(8)],
        "frame_encoder": [
            ("frame_input_proj", "enc_frame_proj"),
            ("frame_pos_embed", "enc_frame_posemb"),
            ("frame_encoder_1", "enc_frame"),
        ]
        + [(f"frame_encoder_1.attn{k}", f"gmm_frame_attn{k}") for k in frame_branches],
    }


def dygmm_errors(model: GMMFormer2, videos: VideoBatch, io: dict[str, np.ndarray], names: dict[str, str]) -> float:
    """Both DyGMM blocks' cross-attention tokens and weights, branch logits and branch weights.

    `names` maps `tokens`, `probs`, `logits`, `weights` to the fixture's array suffix (`gmm_<branch>_<suffix>`);
    arrays the fixture lacks are skipped.
    """
    modules = [f"{block}.{part}" for block in DYGMM_BLOCKS.values() for part in ("ca", "ca.self.dropout", "layer2")]
    with capture_outputs(model, modules) as out:
        model.encode_videos(videos)
    batch, heads = len(videos.video_ids), model.cfg.n_heads
    errors = []
    for branch, block in DYGMM_BLOCKS.items():
        logits = out[f"{block}.layer2"]
        ours = {
            "tokens": out[f"{block}.ca"].reshape(batch, -1, model.cfg.hidden_size),
            "probs": out[f"{block}.ca.self.dropout"].reshape(batch, -1, heads, logits.shape[-1]),
            "logits": logits,
            "weights": model.get_submodule(block).branch_weights(logits),
        }
        for part, suffix in names.items():
            if f"gmm_{branch}_{suffix}" in io:
                errors.append(max_abs_diff(ours[part], io[f"gmm_{branch}_{suffix}"]))
    return max_of(errors)


def gmmformer2_config(config: dict[str, Any]) -> GMMFormer2Config:
    """Our config of the GMMFormer v2 a fixture was made with."""
    return fixture_model_config(GMMFormer2Config, config, {"dygmm_branch_widths": "dygmm_widths"})


@register_reference_check("gmmformer2", fixture_config=gmmformer2_config)
def check_gmmformer2(prefix: str) -> dict[str, float]:
    """GMMFormer v2 against `PREFIX_*`: preprocessing, DyGMM blocks and masks, frame padding, scores, OT and QDL,
    losses and negatives."""
    encoder_groups = {
        "query_encoder": QUERY_ENCODER_STAGES + [("query_encoder.norm1", "enc_query_attn")],
        **video_encoder_groups(),
    }

    def extra(
        model: GMMFormer2, io: dict[str, np.ndarray], q: torch.Tensor, videos: Any, errors: dict[str, float]
    ) -> None:
        batch, _ = fixture_batches(io, io["pre_clip_feats"].shape[0], io["pre_query_feats"].shape[0])
        frames = GMMFormer2Videos.unpack(videos, model.cfg.map_size).frames
        errors["frame_encoder"] = max(errors["frame_encoder"], max_abs_diff(frames, io["enc_frame"]))
        errors["frame_padding"] = max_abs_diff(
            model.pad_frames(batch.frame_feats, batch.frame_mask)[1], io["model_frame_mask"]
        )
        errors["dygmm_mixing"] = dygmm_errors(
            model,
            batch,
            io,
            {"tokens": "ca_tokens", "probs": "ca_probs", "logits": "branch_logits", "weights": "branch_weights"},
        )
        errors["gauss_masks"] = gaussian_mask_errors(io)
        sub_batch = fixture_sub_batch(io)
        sub_encoded = model.encode_videos(sub_batch)
        sub_parts = GMMFormer2Videos.unpack(sub_encoded, model.cfg.map_size)
        errors["sub_batch"] = max_of(
            [
                max_abs_diff(sub_parts.frames, io["sub_enc_frame"]),
                max_abs_diff(sub_parts.clips, io["sub_enc_clip"]),
                max_abs_diff(model.score_branches(q, sub_encoded)["frame"], io["sub_infer_frame_scores"]),
            ]
        )
        scores, queries = fixture_training_scores(model, io)
        second = model.encode_queries(queries)
        errors["train_scores"] = max(
            score_errors(scores, io, VIDEO_BRANCH_TRAIN_SCORES), max_abs_diff(second, io["train_query_vec"])
        )
        cosine, assigned = clip_assignment(second, scores["clips"], queries.labels)
        errors["ot_assignment"] = max_of(
            [
                max_abs_diff(cosine, io["ot_cos"], io["ot_query_used"]),
                max_abs_diff(assigned, io["ot_assign"]),
                max_abs_diff(clip_assignment_loss(cosine, assigned), io["ot_loss_unweighted"]),
            ]
        )
        qdl = focal_query_diverse_loss(second, queries.labels, *model.cfg.neg_factor)
        errors["qdl_unweighted"] = max_abs_diff(qdl, io["qdl_unweighted"])

    return check_fixture(
        prefix,
        lambda c: GMMFormer2(gmmformer2_config(c)),
        encoder_groups,
        extra,
        VIDEO_BRANCH_NEGATIVES,
    )
