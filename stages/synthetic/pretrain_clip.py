"""Pretrain the tiny CLIP of the synthetic dataset: contrastive learning on rendered frames and their descriptions.

    python pipeline.py pretrain-clip                  # the default (params.yaml `pretrain_clip` section)
    python pipeline.py pretrain-clip -s steps=50      # a quick run
    dvc repro pretrain_clip

ProPy keeps CLIP frozen, so the synthetic dataset needs a CLIP whose features mean something. This stage renders
still frames straight from the scene model of `stages.synthetic.scenes` (random shapes, colours, sizes and places
over the dataset's backgrounds; a seed stream disjoint from the dataset's videos), at the size of the decode
stage's frames, describes each one (`a large red square at the top left and a blue circle in the center`), and
trains a randomly initialised OpenAI-layout CLIP with the symmetric InfoNCE loss. The weights are written with
`save_clip`, so later stages load them with `load_clip` exactly like the OpenAI ViT-B/32 file. Text-to-frame
recall on held-out frames is printed and written as a DVC metric. Deterministic given the seed on CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from stages.data.config import BaseConfig
from stages.data.progress import progress_bar
from stages.evaluate.metrics import gt_ranks
from stages.models.clip_backbone import ClipArch, normalize_frames, save_clip, tokenize
from stages.synthetic.scenes import Sprite, background_pixels, describe_still, random_still, render
from stages.train.optim import WarmupCosine, build_adamw

TINY_CLIP = ClipArch(
    embed_dim=128,
    vision_width=128,
    vision_layers=3,
    patch_size=16,
    image_size=64,
    text_width=128,
    text_layers=3,
    context_length=32,
)


@dataclass(frozen=True)
class PretrainClipConfig:
    """The `pretrain_clip` section: architecture, training and evaluation of the tiny synthetic CLIP."""

    arch: ClipArch = TINY_CLIP  # image_size must equal the decode stage's frame size
    output: str = "cache/synthetic/clip_tiny.safetensors"  # the weights file (base.clip_weights points here)
    metrics: str = "metrics/synthetic/pretrain_clip.json"  # held-out text-to-frame recall
    seed_offset: int = 1000  # added to base.seed; the synthetic videos use base.seed itself
    steps: int = 400
    batch_size: int = 64  # frames (and their descriptions) per step; the other frames are the negatives
    lr: float = 1e-3  # peak learning rate (linear warm-up, then cosine)
    warmup: float = 0.05  # fraction of the steps spent warming up
    weight_decay: float = 0.05
    objects: tuple[int, int] = (1, 3)  # shapes per frame (min, max)
    sizes: tuple[float, float] = (0.07, 0.22)  # shape radius range, in units of the frame side
    eval_frames: int = 500  # held-out frames for the recall
    threads: int = 1  # torch CPU threads (2 was 4x slower per step whenever another process shared the 2 cores)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.eval_frames < 2:
            raise ValueError("steps must be >= 1, batch_size and eval_frames >= 2")
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {self.objects}")


def render_stills(
    rng: np.random.Generator, count: int, size: int, cfg: PretrainClipConfig
) -> tuple[np.ndarray, list[str]]:
    """`count` random still frames, uint8 [count, size, size, 3], and their descriptions."""
    frames = np.empty((count, size, size, 3), np.uint8)
    texts = []
    for index in range(count):
        background, states = random_still(rng, cfg.objects, cfg.sizes)
        frames[index] = render(background_pixels(background, size, size), [Sprite.of(s) for s in states])
        texts.append(describe_still(states))
    return frames, texts


def encode_pair(model: CLIP, frames: np.ndarray, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings of a batch."""
    context = model.positional_embedding.shape[0]
    tokens = tokenize(texts, max_words=context)
    tokens = F.pad(tokens, (0, context - tokens.shape[1]))
    images = model.encode_image(normalize_frames(torch.from_numpy(frames)), normalize=True)
    return images, model.encode_text(tokens, normalize=True)


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, text) pairs."""
    logits = logit_scale.exp().clamp(max=100.0) * images @ texts.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def text_to_frame_recall(similarity: torch.Tensor) -> dict[str, float]:
    """Recall@1/5/10 (percent) of text i retrieving frame i among all frames, with chance levels.

    Args:
        similarity: [texts, frames] scores, the matching frame of text i is column i.
    """
    ranks = gt_ranks(similarity, torch.arange(similarity.shape[0]))
    count = similarity.shape[1]
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"R{k}"] = 100.0 * float((ranks <= k).double().mean())
        metrics[f"R{k}_chance"] = 100.0 * min(k, count) / count
    metrics["MedR"] = float(ranks.double().median())
    return metrics


@torch.no_grad()
def evaluate_recall(model: CLIP, frames: np.ndarray, texts: list[str], batch_size: int = 256) -> dict[str, float]:
    """Text-to-frame recall of a CLIP on frames and their descriptions."""
    was_training = model.training
    model.eval()
    images, captions = [], []
    for start in range(0, len(texts), batch_size):
        image, text = encode_pair(model, frames[start : start + batch_size], texts[start : start + batch_size])
        images.append(image)
        captions.append(text)
    model.train(was_training)
    return text_to_frame_recall(torch.cat(captions) @ torch.cat(images).T)


def train_clip(cfg: PretrainClipConfig, seed: int) -> tuple[CLIP, list[float]]:
    """Train a CLIP of `cfg.arch` from scratch on freshly rendered stills; return it and the loss of every step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0])
    model = cfg.arch.build()
    model.train()
    optimizer = build_adamw(model.named_parameters(), cfg.lr, cfg.weight_decay)
    schedule = WarmupCosine(cfg.lr, cfg.steps, cfg.warmup)
    losses = []
    progress = progress_bar(range(cfg.steps), desc="pretrain clip", unit="step")
    for step in progress:
        frames, texts = render_stills(rng, cfg.batch_size, cfg.arch.image_size, cfg)
        schedule.apply(optimizer, step)
        loss = contrastive_loss(*encode_pair(model, frames, texts), model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return model, losses


def run_pretrain_clip(base: BaseConfig, cfg: PretrainClipConfig) -> dict[str, float]:
    """Train the tiny CLIP, write its weights and held-out recall; return the metrics."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        seed = base.seed + cfg.seed_offset
        model, losses = train_clip(cfg, seed)
        frames, texts = render_stills(np.random.default_rng([seed, 1]), cfg.eval_frames, cfg.arch.image_size, cfg)
        metrics = evaluate_recall(model, frames, texts)
    finally:
        torch.set_num_threads(threads)
    digest = save_clip(model, cfg.output)
    report = {
        "split": f"held-out synthetic stills ({cfg.eval_frames} frames and their descriptions)",
        "text_to_frame": metrics,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-20:])),
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "weights_sha256": digest,
        "arch": asdict(cfg.arch),
    }
    path = Path(cfg.metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"pretrain_clip: text->frame R@1 {metrics['R1']:.1f}% R@5 {metrics['R5']:.1f}% "
        f"(chance {metrics['R1_chance']:.2f}% / {metrics['R5_chance']:.2f}%) on {cfg.eval_frames} held-out frames; "
        f"loss {losses[0]:.3f} -> {report['final_loss']:.3f}; {report['seconds']}s -> {cfg.output}"
    )
    if Path(base.clip_weights) != Path(cfg.output):
        print(f"note: base.clip_weights is {base.clip_weights}, so the later stages will not use these weights")
    return metrics
