"""GMMFormer against the official-code fixture (`python pipeline.py verify-reference gmmformer PREFIX`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.models.baselines.gmmformer import GMMFormer, GMMFormerConfig, GMMFormerVideos
from stages.models.baselines.reference import (
    QUERY_ENCODER_STAGES,
    VIDEO_BRANCH_NEGATIVES,
    VIDEO_BRANCH_TRAIN_SCORES,
    capture_outputs,
    check_fixture,
    fixture_model_config,
    fixture_sub_batch,
    gaussian_mask_errors,
    max_abs_diff,
    max_of,
    train_score_errors,
)
from stages.models.reference import register_reference_check


def gmmformer_config(config: dict[str, Any]) -> GMMFormerConfig:
    """Our config of the GMMFormer a fixture was made with."""
    return fixture_model_config(GMMFormerConfig, config)


@register_reference_check("gmmformer", fixture_config=gmmformer_config)
def check_gmmformer(prefix: str) -> dict[str, float]:
    """GMMFormer against `PREFIX_*`: preprocessing, GMM blocks and masks, scores, sub-batch padding, losses."""
    encoder_groups = {
        "query_encoder": QUERY_ENCODER_STAGES,
        "clip_encoder": [
            ("clip_input_proj", "enc_clip_proj"),
            ("clip_pos_embed", "enc_clip_posemb"),
            ("clip_encoder", "enc_clip_1"),
            ("clip_encoder_2", "enc_clip"),
        ]
        + [(f"clip_encoder.attn{i}", f"gmm_clip1_attn{i}") for i in range(4)],
        "frame_encoder": [
            ("frame_input_proj", "enc_frame_proj"),
            ("frame_pos_embed", "enc_frame_posemb"),
            ("frame_encoder_1", "enc_frame_1"),
            ("frame_encoder_2", "enc_frame"),
        ]
        + [(f"frame_encoder_1.attn{i}", f"gmm_frame1_attn{i}") for i in range(4)],
    }

    def extra(
        model: GMMFormer, io: dict[str, np.ndarray], q: torch.Tensor, videos: Any, errors: dict[str, float]
    ) -> None:
        frame_vec = GMMFormerVideos.unpack(videos).frame_vec
        errors["frame_encoder"] = max(errors["frame_encoder"], max_abs_diff(frame_vec, io["frame_vec"]))
        errors["gauss_masks"] = gaussian_mask_errors(io)
        sub_batch = fixture_sub_batch(io)
        with capture_outputs(model, ["frame_encoder_2"]) as out:
            sub_encoded = model.encode_videos(sub_batch)
        errors["sub_batch"] = max_of(
            [
                max_abs_diff(out["frame_encoder_2"], io["sub_enc_frame"], io["sub_frame_mask"]),
                max_abs_diff(GMMFormerVideos.unpack(sub_encoded).frame_vec, io["sub_frame_vec"]),
                max_abs_diff(model.score_branches(q, sub_encoded)["frame"], io["sub_infer_frame_scores"]),
            ]
        )
        errors["train_scores"] = train_score_errors(model, io, VIDEO_BRANCH_TRAIN_SCORES)

    return check_fixture(
        prefix,
        lambda c: GMMFormer(gmmformer_config(c)),
        encoder_groups,
        extra,
        VIDEO_BRANCH_NEGATIVES,
    )
