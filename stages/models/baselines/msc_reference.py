"""MSC-PRVR against the official-code fixture (`python pipeline.py verify-reference msc PREFIX`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.data.errors import PipelineError
from stages.models.baselines.gmmformer2_reference import dygmm_errors, video_encoder_groups
from stages.models.baselines.msc import MSC, MSCConfig, MSCPreprocessConfig
from stages.models.baselines.msc_losses import rkd_angle, rkd_distance
from stages.models.baselines.preprocessing import bin_edges, bin_ranges
from stages.models.baselines.reference import (
    QUERY_ENCODER_STAGES,
    VIDEO_BRANCH_NEGATIVES,
    VIDEO_BRANCH_TRAIN_SCORES,
    check_fixture,
    fixture_batches,
    fixture_model_config,
    fixture_preprocess_config,
    fixture_training_scores,
    gaussian_mask_errors,
    max_abs_diff,
    max_of,
    raw_videos,
    score_errors,
    train_batch,
)
from stages.models.reference import register_reference_check


def msc_config(config: dict[str, Any]) -> MSCConfig:
    """Our MSC config from the fixture's: `clip_len` is our map_size (the fixture's map_size is the averaging length,
    which must equal max_ctx_l like `frame_len`), the merge targets come from `preprocessing`."""
    model_config, loss, pre = config["model_config"], config["loss_config"], config["preprocessing"]
    if pre["avg_length"] != model_config["max_ctx_l"]:
        raise PipelineError(f"fixture config: avg_length {pre['avg_length']} != max_ctx_l {model_config['max_ctx_l']}")
    ranks = tuple((threshold, rank) for threshold, rank in loss["adaptive_rank_thresholds"] if threshold is not None)
    cfg = fixture_model_config(
        MSCConfig,
        config,
        renames={"gmm_widths": "dygmm_widths", "clip_len": "map_size"},
        extra={"merge_targets": tuple(pre["merge_targets"]), "adaptive_ranks": ranks},
    )
    derived = sorted((rank for _, rank in ranks), reverse=True)
    if loss["adaptive_rank_thresholds"][-1] != [None, cfg.map_size] or loss["loss_merge_targets"] != derived:
        raise PipelineError(f"fixture config: adaptive ranks {loss['adaptive_rank_thresholds']} are not supported")
    return cfg


def merging_errors(cfg: MSCPreprocessConfig, io: dict[str, np.ndarray]) -> float:
    """The averaging and every merge stage (pair similarities and decisions, intermediate rows, sizes, labels)."""
    averaged = [cfg.average(frames) for frames in raw_videos(io)]
    stages = [cfg.merge_stages(rows) for rows in averaged]
    errors = [
        max_abs_diff(np.stack(averaged), io[f"pre_avg{cfg.max_ctx_l}"]),
        max_abs_diff(
            np.stack([bin_ranges(bin_edges(int(t), cfg.max_ctx_l)) for t in io["raw_video_num_frames"]]),
            io[f"pre_avg{cfg.max_ctx_l}_bins"],
        ),
    ]
    for index, target in enumerate(cfg.merge_targets):
        ours = [video[index] for video in stages]
        errors.append(max_abs_diff(np.stack([s.pair_similarity for s in ours]), io[f"pre_pair_sim_{target}"]))
        errors.append(
            max_abs_diff(np.stack([s.merged for s in ours]).astype(np.int64), io[f"pre_pair_merged_{target}"])
        )
        if f"pre_merge{target}_feats" in io:
            errors.append(max_abs_diff(np.stack([s.tokens for s in ours]), io[f"pre_merge{target}_feats"]))
            errors.append(max_abs_diff(np.stack([s.sizes for s in ours]), io[f"pre_merge{target}_size"]))
            errors.append(max_abs_diff(np.stack([s.labels for s in ours]), io[f"pre_merge{target}_label"]))
    return max_of(errors)


@register_reference_check("msc", fixture_config=msc_config)
def check_msc(prefix: str) -> dict[str, float]:
    """MSC against `PREFIX_*`: preprocessing (averaging, merge stages), encoders with merge-size attention, DyGMM
    mixing, scores, the teacher, the video-level alignment internals, RKD, losses and negatives."""
    config: dict[str, Any] = {}  # the fixture's config.json, read once by check_fixture

    def build(fixture: dict[str, Any]) -> MSC:
        config.update(fixture)
        return MSC(msc_config(fixture))

    encoder_groups = {
        "query_encoder": QUERY_ENCODER_STAGES
        + [("query_encoder.self", "enc_query_selfattn"), ("query_encoder.norm1", "enc_query_norm1")],
        **video_encoder_groups(frame_branches=(0, 6)),
    }

    def extra(model: MSC, io: dict[str, np.ndarray], q: torch.Tensor, videos: Any, errors: dict[str, float]) -> None:
        pre = fixture_preprocess_config(model, config)
        errors["preprocess_merging"] = merging_errors(pre, io)
        batch, queries = fixture_batches(io, io["pre_clip_feats"].shape[0], io["pre_query_feats"].shape[0])
        errors["dygmm_mixing"] = dygmm_errors(
            model, batch, io, {"tokens": "wtok", "logits": "logits", "weights": "mix"}
        )
        errors["gauss_masks"] = gaussian_mask_errors(io)
        key_frame = model.score_branches(q, videos)["key_frame"]
        errors["inference_scores"] = max(errors["inference_scores"], max_abs_diff(key_frame, io["infer_key_frame"]))

        train = train_batch(config, io, pre)
        raw_order = np.argsort([config["data"]["query_ids"].index(qid) for qid in train.queries.query_ids])
        teacher = queries.last_tokens()
        errors["teacher"] = max(
            max_abs_diff(teacher, io["clip_query"]),
            max_abs_diff(train.queries.last_tokens()[raw_order], io["train_clip_query"]),
        )
        scores, _ = fixture_training_scores(model, io)
        errors["train_scores"] = score_errors(scores, io, VIDEO_BRANCH_TRAIN_SCORES)
        errors["video_projection"] = max(
            max_abs_diff(model.vproj_clip(scores["clips"]), io["vproj_clip"]),
            max_abs_diff(model.vproj_clip(scores["frames"]), io["vproj_frame"]),
        )
        alignment = model.alignment(
            batch.clip_feats, batch.clip_sizes, batch.frame_labels, scores["clips"], scores["frames"]
        )
        segments = torch.stack(
            [F.pad(s.values, (0, 0, 0, model.cfg.map_size - len(s.values))) for s in alignment.segments]
        )
        errors["vl_internals"] = max_of(
            [
                max_abs_diff(alignment.ratio, io["vl_intra_ratio"]),
                max_abs_diff(np.array(alignment.ranks), io["vl_rank"]),
                max_abs_diff(np.array([len(s.values) for s in alignment.segments]), io["vl_num_segments"]),
                max_abs_diff(segments, io["vl_segments"]),
                max_abs_diff(torch.stack([s.frame_labels for s in alignment.segments]), io["vl_frame_label"]),
                max_abs_diff(alignment.per_video, io["vl_loss_per_video"]),
                max_abs_diff(alignment.frame_to_clip, io["vl_loss_f2c"]),
                max_abs_diff(alignment.clip_to_frame, io["vl_loss_c2f"]),
            ]
        )
        errors["rkd"] = max(
            max_abs_diff(rkd_distance(scores["query_vec"], teacher), io["rkd_distance"]),
            max_abs_diff(rkd_angle(scores["query_vec"], teacher), io["rkd_angle"]),
        )

    return check_fixture(prefix, build, encoder_groups, extra, VIDEO_BRANCH_NEGATIVES)
