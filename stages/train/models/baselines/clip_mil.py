"""Frozen-CLIP MIL: the no-training reference row. A query is CLIP's sentence feature (the EOT token of the stored
last-layer token features); a video is its stored frame features; the score is the max over frames of the cosine.

It reads the same feature store and batches as the trained baselines, so its numbers show what training adds.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.train.models.baselines.data import QueryBatch, VideoBatch
from stages.train.models.registry import register_model


class FrozenClipMIL(nn.Module):
    """No parameters: frame features are the units, the EOT token feature is the query."""

    def encode_videos(self, batch: VideoBatch) -> torch.Tensor:
        """[B, L_f, D] frame features; padded rows repeat the first frame, so they never change the max."""
        mask = batch.frame_mask.bool().unsqueeze(-1)
        return torch.where(mask, batch.frame_feats, batch.frame_feats[:, :1])

    def encode_queries(self, batch: QueryBatch) -> torch.Tensor:
        """[N, D] the feature of each query's last real token (EOT: CLIP's sentence embedding)."""
        last = batch.query_mask.sum(dim=1).long() - 1
        return batch.query_feats[torch.arange(len(last)), last]


@register_model("clip_mil")
def build_clip_mil() -> FrozenClipMIL:
    """The frozen-CLIP MIL reference (nothing to configure or train)."""
    return FrozenClipMIL()
