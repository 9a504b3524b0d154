"""Frozen-CLIP MIL: the no-training reference row. A query is CLIP's sentence feature (the EOT token of the stored
last-layer token features); a video is its stored frame features; the score is the max over frames of the cosine.

It reads the same feature store and batches as the trained baselines, so its numbers show what training adds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stages.models.baselines.base import MomentUnits
from stages.models.baselines.data import QueryBatch, VideoBatch
from stages.models.baselines.preprocessing import PreprocessConfig
from stages.models.registry import register_model

MIL_PREPROCESS = PreprocessConfig(max_ctx_l=100_000, max_desc_l=1_000)  # every frame and token, L2-normalised


class FrozenClipMIL(nn.Module):
    """No parameters: frame features are the units, the EOT token feature is the query.

    Args:
        max_frames: every video is padded to this many units (the longest video of the corpus), so that all video
            batches have one shape; padded units repeat the first frame and never change the max. None pads each
            batch to its longest video.
    """

    def __init__(self, max_frames: int | None) -> None:
        super().__init__()
        self.max_frames = max_frames

    def preprocess_config(self) -> PreprocessConfig:
        """Every frame and token, L2-normalised."""
        return MIL_PREPROCESS

    def encode_videos(self, batch: VideoBatch) -> torch.Tensor:
        """[B, max_frames, D] frame features."""
        pad = (self.max_frames or batch.frame_feats.shape[1]) - batch.frame_feats.shape[1]
        feats = torch.nn.functional.pad(batch.frame_feats, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(batch.frame_mask, (0, pad))
        return torch.where(mask.bool().unsqueeze(-1), feats, feats[:, :1])

    def encode_queries(self, batch: QueryBatch) -> torch.Tensor:
        """[N, D] the feature of each query's last real token (EOT: CLIP's sentence embedding)."""
        return batch.last_tokens()

    def moment_units(self, batch: VideoBatch, num_frames: Sequence[int]) -> MomentUnits:
        """Every real frame is a unit, one frame long; padded units are not."""
        length = self.max_frames or batch.frame_feats.shape[1]
        windows = torch.full((len(num_frames), length, 2), float("nan"))
        for row, total in enumerate(num_frames):
            starts = torch.arange(total, dtype=torch.float32)
            windows[row, :total] = torch.stack([starts, starts + 1], dim=1) / total
        return MomentUnits(torch.arange(length), windows)


@register_model("clip_mil", trainable=False)
def build_clip_mil(max_frames: int | None = None) -> FrozenClipMIL:
    """The frozen-CLIP MIL reference (nothing to train)."""
    return FrozenClipMIL(max_frames)
