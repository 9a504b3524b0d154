"""MS-SL against the official-code fixture (`python pipeline.py verify-reference msl PREFIX`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.models.baselines.msl import MSSL, MSSLConfig, MSSLVideos
from stages.models.baselines.reference import (
    QUERY_ENCODER_STAGES,
    check_fixture,
    fixture_model_config,
    max_abs_diff,
    train_score_errors,
)
from stages.models.reference import register_reference_check


def msl_config(config: dict[str, Any]) -> MSSLConfig:
    """Our config of the MS-SL a fixture was made with."""
    return fixture_model_config(MSSLConfig, config)


@register_reference_check("msl", fixture_config=msl_config)
def check_msl(prefix: str) -> dict[str, float]:
    """MS-SL against `PREFIX_*`: preprocessing, encoders, proposals, scores, frame attention, losses, negatives."""
    encoder_groups = {
        "query_encoder": QUERY_ENCODER_STAGES,
        "clip_encoder": [
            ("clip_input_proj", "enc_clip_proj"),
            ("clip_pos_embed", "enc_clip_posemb"),
            ("clip_encoder", "enc_clip"),
        ],
        "frame_encoder": [
            ("frame_input_proj", "enc_frame_proj"),
            ("frame_pos_embed", "enc_frame_posemb"),
            ("frame_encoder", "enc_frame"),
        ],
    }

    def extra(model: MSSL, io: dict[str, np.ndarray], q: torch.Tensor, videos: Any, errors: dict[str, float]) -> None:
        parts = MSSLVideos.unpack(videos, model.cfg.max_ctx_l)
        errors["clip_encoder"] = max(errors["clip_encoder"], max_abs_diff(parts.proposals, io["clip_proposals"]))
        key_clips = model.clip_scores(q, parts)[1]
        errors["frame_attention"] = max_abs_diff(model.frame_features(key_clips, parts), io["infer_frame_attn_feat"])
        errors["train_scores"] = train_score_errors(
            model,
            io,
            {
                "clip": "train_clip_scores",
                "clip_raw": "train_clip_scores_raw",
                "frame": "train_frame_scores",
                "frame_raw": "train_frame_scores_raw",
                "frame_feat": "train_frame_feat",
                "key_clip": "train_key_clip",
            },
        )

    negative_keys = {
        "clip_t2v": "train_clip_scores",
        "clip_v2t": "train_clip_scores",
        "frame_row": "train_frame_scores",
        "frame_col": "train_frame_scores",
    }
    return check_fixture(prefix, lambda c: MSSL(msl_config(c)), encoder_groups, extra, negative_keys)
