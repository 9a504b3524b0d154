"""Tiny raw feature sets for the baseline tests: videos, token features and annotations with shared content."""

from __future__ import annotations

import numpy as np

from stages.data.schema import Query


def tiny_features(
    num_videos: int, seed: int, visual_dim: int, text_dim: int, split: str = "train"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Query]]:
    """Videos of 5..40 raw frames with 1..3 queries each (video and text features, annotations).

    A query shares content with its video: its tokens 1-2 contain the video's first two frames and its last token
    (CLIP's sentence slot) one random frame.
    """
    rng = np.random.default_rng(seed)
    videos, texts, queries = {}, {}, []
    for v in range(num_videos):
        frames = rng.normal(size=(int(rng.integers(5, 41)), visual_dim)).astype(np.float32)
        videos[f"{split}{v}"] = frames
        for k in range(int(rng.integers(1, 4))):
            qid = f"{split}{v}#{k}"
            tokens = rng.normal(size=(int(rng.integers(3, 13)), text_dim)).astype(np.float32)
            tokens[1:3] += frames[:2, :text_dim]
            tokens[-1] += frames[rng.integers(len(frames)), :text_dim]
            texts[qid] = tokens
            queries.append(Query(qid, "text", f"{split}{v}", 10.0, ((0.0, 1.0),), split))
    return videos, texts, queries
