"""HLFormer against the official-code fixture (`python pipeline.py verify-reference hlformer PREFIX`).

Beyond the family's checks (preprocessing, query encoder, scores, losses of every mode, negatives): the Lorentz
branches' internals (input projection, point, LorentzLinear heads, midpoints, tangents, output projection), every
branch output, the mixture (weight token, its cross-attention reads, branch logits and weights), the Gaussian masks,
the pad probe of the frame score, the hyperbolic embeddings with the entailment loss and its probe, and the
mode-independent losses. The frame block is compared at every one of its rows: padded rows feed the weight token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.models.baselines.data import TrainBatch
from stages.models.baselines.gmmformer2 import GMMFormer2Videos
from stages.models.baselines.hlformer import HLFormer, HLFormerBlock, HLFormerConfig
from stages.models.baselines.lorentz import entailment_loss
from stages.models.baselines.losses import NegativeSampling, focal_query_diverse_loss
from stages.models.baselines.reference import (
    QUERY_ENCODER_STAGES,
    VIDEO_BRANCH_NEGATIVES,
    VIDEO_BRANCH_TRAIN_SCORES,
    capture_outputs,
    check_fixture,
    fixture_batches,
    fixture_model_config,
    fixture_preprocess_config,
    gaussian_mask_errors,
    max_abs_diff,
    max_of,
    train_batch,
    train_score_errors,
)
from stages.models.reference import register_reference_check

LORENTZ_OUTPUTS = {"inproj": "input_proj", "mid": "lorentz_multiattention", "out": "output_proj"}
LORENTZ_HEADS = {"q": "linear_query", "k": "linear_keys", "v": "linear_values"}
LORENTZ_INPUTS = {"point": "lorentz_multiattention", "tangent": "output_proj"}


def _derived(cfg: HLFormerConfig) -> dict[str, Any]:
    """The fixture's `model_config` entries of the Lorentz branches that our config derives."""
    return {
        "lorentz_model_dim": cfg.lorentz_dim + 1,
        "lorentz_dim_per_head": (cfg.lorentz_dim + 1) // cfg.n_heads,
        "branches_per_geometry": cfg.attention_num // 2,
        "gauss_widths": list(cfg.gauss_widths),
    }


def _block_errors(
    model: HLFormer, io: dict[str, np.ndarray], branch: str, block: HLFormerBlock, mask: torch.Tensor | None, run: Any
) -> dict[str, float]:
    """Errors of one block's branch outputs, Lorentz internals and mixture (`branch`: clip or frame)."""
    prefix = "clip_encoder" if branch == "clip" else "frame_encoder_1"
    n = len(block.e_attns)
    branches = [f"{prefix}.{g}_attns.{i}" for g in "eh" for i in range(n)]
    stored = [i for i in range(n) if f"hl_{branch}_e{i}" in io]
    internals = [i for i in range(n) if any(k.startswith(f"lz_{branch}_h{i}_") for k in io)]
    outputs = [f"{prefix}.h_attns.{i}.self.{m}" for i in internals for m in LORENTZ_OUTPUTS.values()]
    outputs += [
        f"{prefix}.h_attns.{i}.self.lorentz_multiattention.{m}" for i in internals for m in LORENTZ_HEADS.values()
    ]
    inputs = [f"{prefix}.h_attns.{i}.self.{m}" for i in internals for m in LORENTZ_INPUTS.values()]
    with (
        capture_outputs(model, [*branches, f"{prefix}.ca", f"{prefix}.layer2", *outputs]) as out,
        capture_outputs(model, inputs, inputs=True) as inp,
    ):
        run()

    def compare(pairs: dict[str, Any]) -> float:
        return max_of(max_abs_diff(value, io[key]) for key, value in pairs.items() if key in io)

    lorentz = {}
    for i in internals:
        module = f"{prefix}.h_attns.{i}.self"
        lorentz |= {f"lz_{branch}_h{i}_{k}": out[f"{module}.{m}"] for k, m in LORENTZ_OUTPUTS.items()}
        lorentz |= {
            f"lz_{branch}_h{i}_{k}": out[f"{module}.lorentz_multiattention.{m}"] for k, m in LORENTZ_HEADS.items()
        }
        lorentz |= {f"lz_{branch}_h{i}_{k}": inp[f"{module}.{m}"] for k, m in LORENTZ_INPUTS.items()}
    branch_outputs = [out[name] for name in branches]
    logits = out[f"{prefix}.layer2"]
    mixture = {
        f"hl_{branch}_wtok_in": block.weight_token(torch.stack(branch_outputs, dim=1), mask),
        f"hl_{branch}_wtok": out[f"{prefix}.ca"].view(len(logits), 2 * n, -1),
        f"hl_{branch}_logits": logits,
        f"hl_{branch}_mix": block.branch_weights(logits),
    }
    outputs_by_name = {f"hl_{branch}_{g}{i}": out[f"{prefix}.{g}_attns.{i}"] for g in "eh" for i in stored}
    return {
        f"{branch}_branches": compare(outputs_by_name),
        f"{branch}_lorentz": compare(lorentz),
        f"{branch}_mixture": compare(mixture),
    }


def _hyperbolic_errors(model: HLFormer, io: dict[str, np.ndarray]) -> dict[str, float]:
    """Hyperbolic pools, embeddings, curvature, angles and the entailment loss (raw order), and the cone probe."""
    videos, queries = fixture_batches(io, io["pre_clip_feats"].shape[0], io["pre_query_feats"].shape[0])
    scores = model.training_scores(TrainBatch(videos, queries))
    _, mask = model.pad_frames(videos.frame_feats, videos.frame_mask)
    with capture_outputs(model, ["modular_vector_mapping_2", "modular_vector_mapping_3"]) as out:
        points = model.hyperbolic_embeddings(scores["query_vec"], scores["clips"], scores["frames"], mask)
    labels = torch.from_numpy(io["query_video"])
    cone = entailment_loss(points["video"][labels], points["query"], points["curv"], model.cfg.entailment_min_radius)
    probe = entailment_loss(
        torch.from_numpy(io["probe_x"]),
        torch.from_numpy(io["probe_y"]),
        points["curv"],
        model.cfg.entailment_min_radius,
    )
    ours = {
        "hyp_frame_pool": points["frame_pool"],
        "hyp_clip_pool": points["clip_pool"],
        "hyp_frame_pool_logits": out["modular_vector_mapping_2"].squeeze(-1),
        "hyp_clip_pool_logits": out["modular_vector_mapping_3"].squeeze(-1),
        "hyp_video": points["video"],
        "hyp_query": points["query"],
        "hyp_curv": points["curv"],
        "hyp_angle": cone["angle"],
        "hyp_aperture": cone["aperture"],
        "loss_entailment": cone["loss"],
    }
    probes = {"probe_angle": probe["angle"], "probe_aperture": probe["aperture"], "probe_entailment": probe["loss"]}
    return {
        "hyperbolic": max_of(max_abs_diff(value, io[key]) for key, value in ours.items()),
        "entailment_probe": max_of(max_abs_diff(value, io[key]) for key, value in probes.items()),
    }


def _fixed_loss_errors(model: HLFormer, config: dict[str, Any], io: dict[str, np.ndarray]) -> float:
    """The loss terms that no negative sampling changes, on the official training batch."""
    batch = train_batch(config, io, fixture_preprocess_config(model, config))
    losses, _ = model(batch, NegativeSampling(hard=True, pool_size=1))
    queries = model.encode_queries(batch.queries)
    raw_qdl = focal_query_diverse_loss(queries, batch.queries.labels, *model.cfg.neg_factor)
    names = {"clip_nce": "loss_clip_nce", "frame_nce": "loss_frame_nce", "qdl": "loss_qdl", "pop": "loss_pop"}
    errors = [max_abs_diff(losses[ours], io[ref]) for ours, ref in names.items()]
    return max_of([*errors, max_abs_diff(raw_qdl, io["loss_qdl_raw"])])


def _pad_probe_frame_scores(model: HLFormer, io: dict[str, np.ndarray], videos: torch.Tensor) -> torch.Tensor:
    """The frame scores of the README's probe context `m (-mean_q q/|q| + 0.1 E_f/|E_f|)`, where pads score 0."""
    mean_query = F.normalize(torch.from_numpy(io["query_vec"]), dim=-1).mean(dim=0)
    frames = F.normalize(torch.from_numpy(io["enc_frame"]), dim=-1)
    probe = torch.from_numpy(io["pre_frame_mask"])[..., None] * (-mean_query + 0.1 * frames)
    parts = GMMFormer2Videos.unpack(videos, model.cfg.map_size)
    probe_videos = GMMFormer2Videos(parts.clips, probe).pack()
    return model.score_branches(torch.from_numpy(io["query_vec"]), probe_videos)["frame"]


def hlformer_config(config: dict[str, Any]) -> HLFormerConfig:
    """Our config of the HLFormer a fixture was made with."""
    return fixture_model_config(HLFormerConfig, config, derived=_derived)


@register_reference_check("hlformer", fixture_config=hlformer_config)
def check_hlformer(prefix: str) -> dict[str, float]:
    """HLFormer against `PREFIX_*`: see the module docstring for what is compared."""
    fixture_config: dict[str, Any] = {}

    def build(config: dict[str, Any]) -> HLFormer:
        fixture_config.update(config)
        return HLFormer(hlformer_config(config))

    encoder_groups = {
        "query_encoder": QUERY_ENCODER_STAGES
        + [("query_encoder.self", "enc_query_selfattn"), ("query_encoder.norm1", "enc_query_norm1")],
        "clip_encoder": [
            ("clip_input_proj", "enc_clip_proj"),
            ("clip_pos_embed", "enc_clip_posemb"),
            ("clip_encoder", "enc_clip"),
        ],
    }

    def extra(
        model: HLFormer, io: dict[str, np.ndarray], q: torch.Tensor, videos: Any, errors: dict[str, float]
    ) -> None:
        video_batch, _ = fixture_batches(io, io["pre_clip_feats"].shape[0], io["pre_query_feats"].shape[0])
        _, frame_mask = model.pad_frames(video_batch.frame_feats, video_batch.frame_mask)
        with capture_outputs(model, ["frame_pos_embed"]) as out:
            errors |= _block_errors(
                model, io, "clip", model.clip_encoder, None, lambda: model.encode_videos(video_batch)
            )
            errors |= _block_errors(
                model, io, "frame", model.frame_encoder_1, frame_mask, lambda: model.encode_videos(video_batch)
            )
        frames = GMMFormer2Videos.unpack(videos, model.cfg.map_size).frames
        errors["frame_encoder"] = max(
            max_abs_diff(out["frame_pos_embed"], io["enc_frame_posemb"]), max_abs_diff(frames, io["enc_frame"])
        )
        errors["gauss_masks"] = gaussian_mask_errors(io)
        branches = model.score_branches(q, videos)
        errors["inference_scores"] = max(
            errors["inference_scores"],
            max_abs_diff(branches["key_frame"], io["infer_key_frame"]),
            max_abs_diff(_pad_probe_frame_scores(model, io, videos), io["probe_pad_frame_scores"]),
        )
        errors["train_scores"] = train_score_errors(model, io, VIDEO_BRANCH_TRAIN_SCORES)
        errors |= _hyperbolic_errors(model, io)
        errors["loss_fixed_terms"] = _fixed_loss_errors(model, fixture_config, io)

    return check_fixture(prefix, build, encoder_groups, extra, VIDEO_BRANCH_NEGATIVES)
