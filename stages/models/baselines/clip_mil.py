"""Frozen-CLIP MIL: the no-training reference row. A query is CLIP's sentence feature (the EOT token of the stored
last-layer token features); a video is its stored frame features; the score is the max over frames of the cosine.

It reads the same feature store and batches as the trained baselines, so its numbers show what training adds.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.models.baselines.data import QueryBatch, VideoBatch
from stages.models.registry import register_model


class FrozenClipMIL(nn.Module):
    """No parameters: frame features are the units, the EOT token feature is the query.

    Args:
        max_frames: every video is padded to this many units (the longest video of the corpus), so that all video
            batches have one shape; padded units repeat the first frame and never change the max.
    """

    def __init__(self, max_frames: int) -> None:
        super().__init__()
        self.max_frames = max_frames

    def encode_videos(self, batch: VideoBatch) -> torch.Tensor:
        """[B, max_frames, D] frame features."""
        feats = torch.nn.functional.pad(batch.frame_feats, (0, 0, 0, self.max_frames - batch.frame_feats.shape[1]))
        mask = torch.nn.functional.pad(batch.frame_mask, (0, self.max_frames - batch.frame_mask.shape[1]))
        return torch.where(mask.bool().unsqueeze(-1), feats, feats[:, :1])

    def encode_queries(self, batch: QueryBatch) -> torch.Tensor:
        """[N, D] the feature of each query's last real token (EOT: CLIP's sentence embedding)."""
        return batch.last_tokens()


@register_model("clip_mil", trainable=False)
def build_clip_mil(max_frames: int) -> FrozenClipMIL:
    """The frozen-CLIP MIL reference (nothing to train)."""
    return FrozenClipMIL(max_frames)
