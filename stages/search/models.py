"""The trained models search uses, behind one interface: videos of the frame cache to units, texts to queries.

- ProPy (`inputs="frames"`): the evaluation encoder (`PropyEncoder`) on the evaluation frame sampling; units are the
  MIL events with their pyramid windows (`model.proposals`).
- Every feature model of the registry (MS-SL, GMMFormer, Prototypes, frozen-CLIP MIL and any model added later):
  CLIP frame features computed by the `features` stage's code, the model's own `encode_videos`, and
  `model.moment_units` for which packed rows are moments and where (`BaselineModel.moment_units`). Models with a
  `score_fn` keep their packed tensor, so search scores them with it, as evaluation does.
Models are loaded from their path as evaluation loads them (`load_trained_propy(..., checkpoint=)`, `load_baseline`),
so a checkpoint written by `import-checkpoint` indexes like a trained one, whatever config it records.
The identity of a model (weights sha256 and config) is what an index records and checks.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.data.checkpoint import load_checkpoint
from stages.data.config import BaseConfig, config_from_dict
from stages.data.device import autocast_dtype, resolve_device
from stages.data.errors import PipelineError
from stages.data.files import file_sha256
from stages.data.frame_cache import FrameCache
from stages.data.frame_dataset import FrameDataset
from stages.evaluate.retrieval import ScoreFn
from stages.extract.features import encode_videos as clip_frame_features
from stages.extract.features import query_features
from stages.models import build_model, model_spec
from stages.models.baselines.data import QueryDataset, VideoDataset, collate_queries, collate_videos
from stages.models.clip_backbone import load_clip
from stages.models.propy import ProPy
from stages.models.trained import PropyEncoder, baseline_dir, load_baseline, load_trained_propy, propy_dir


@dataclass(frozen=True)
class ModelChoice:
    """Which trained model indexes and searches; recorded in the index, so that search rebuilds the same model."""

    name: str  # a registered model: propy or a feature model (msl, gmmformer, prototypes, clip_mil, ...)
    checkpoint: str | None  # ProPy checkpoint file or baseline folder (None: nothing to load, frozen-CLIP MIL)
    clip_weights: str  # the CLIP of feature models; ProPy's unless its checkpoint records an existing one
    max_words: int = 32  # ProPy: tokens per query (train_propy.max_words)
    tail_fix: bool = False  # ProPy: frame sampling (train_propy.tail_fix)
    amp: bool = True  # mixed precision on GPUs (train_propy.amp)

    @classmethod
    def trained(cls, base: BaseConfig, name: str, checkpoint: str | None = None, **settings: Any) -> ModelChoice:
        """The model `name` at `checkpoint` or, by default, where `dvc repro` trained it (absolute paths)."""
        spec = model_spec(name)
        if checkpoint is None and spec.trainable:
            default = propy_dir(base) / "best.pt" if spec.inputs == "frames" else baseline_dir(base, name)
            checkpoint = str(default)
        resolved = None if checkpoint is None else str(Path(checkpoint).resolve())
        return cls(name, resolved, str(Path(base.clip_weights).resolve()), **settings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able mapping that `from_dict` takes back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ModelChoice:
        """The choice `to_dict` wrote (unknown or mistyped keys: an error naming `where`)."""
        return config_from_dict(cls, data, where)


@dataclass(frozen=True)
class EncodedVideo:
    """What a model stores of one video."""

    units: np.ndarray  # float32 [U, D] moment units (L2-normalised unless the model scores raw units)
    windows: np.ndarray  # float32 [U, 2] each unit's [start, end] as fractions of the video
    packed: np.ndarray | None = None  # float32 [K, D] the model's own per-video tensor (models with a score_fn)


class SearchModel(abc.ABC):
    """A trained model as search uses it."""

    name: str
    identity: dict[str, Any]  # weights sha256, CLIP sha256, config (JSON types): another index's is refused
    score_fn: ScoreFn | None = None  # the model's own similarity over packed videos; None: max over units

    @abc.abstractmethod
    def encode_videos(self, cache: FrameCache, keys: list[str]) -> list[EncodedVideo]:
        """Encode the cached videos `keys` (one forward pass)."""

    @abc.abstractmethod
    def encode_queries(self, texts: list[str]) -> Tensor:
        """[q, D] query embeddings (float32, CPU)."""


class PropySearchModel(SearchModel):
    """ProPy: the events of its pyramid are the units."""

    def __init__(self, model: ProPy, choice: ModelChoice, clip_sha256: str | None, device: torch.device) -> None:
        self.name = choice.name
        self.encoder = PropyEncoder(model, device, autocast_dtype(device, choice.amp), choice.max_words)
        self.tail_fix = choice.tail_fix
        self.normalize_units = model.config.normalize_eval
        self.identity = {
            "model": choice.name,
            "weights_sha256": file_sha256(choice.checkpoint),
            "clip_sha256": clip_sha256,
            "config": model.config.to_dict(),  # JSON types already
            "encoding": {"max_words": choice.max_words, "tail_fix": choice.tail_fix},
        }

    @torch.inference_mode()
    def encode_videos(self, cache: FrameCache, keys: list[str]) -> list[EncodedVideo]:
        """Events [Ne', E] of each video from its evaluation frames (segment centres)."""
        nf = self.encoder.model.pyramid.num_frames
        dataset = FrameDataset(cache, keys, nf, train=False, tail_fix=self.tail_fix)
        frames = torch.stack([dataset[i][0] for i in range(len(keys))])
        events = self.encoder.encode_videos((frames, None)).cpu()
        if self.normalize_units:
            events = F.normalize(events, dim=-1)
        windows = self.encoder.unit_windows.numpy().astype(np.float32)
        return [EncodedVideo(video.numpy(), windows) for video in events]

    @torch.inference_mode()
    def encode_queries(self, texts: list[str]) -> Tensor:
        return self.encoder.encode_queries(texts).cpu()


class FeatureSearchModel(SearchModel):
    """A model on CLIP frame features: its moment units (`moment_units`), and its packed tensor when it has a
    score of its own."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        clip: nn.Module,
        identity: dict[str, Any],
        device: torch.device,
        batch_frames: int,
    ) -> None:
        self.name, self.identity, self.device, self.batch_frames = name, identity, device, batch_frames
        self.model = model.eval().to(device)
        self.clip = clip.to(device)
        self.preprocess = model.preprocess_config()
        self.score_fn = self._score if getattr(model, "score_fn", None) is not None else None

    @torch.inference_mode()
    def _score(self, queries: Tensor, videos: Tensor) -> Tensor:
        """The model's own score on its device, returned on the CPU."""
        return self.model.score_fn(queries.to(self.device), videos.to(self.device)).cpu()

    @torch.inference_mode()
    def encode_videos(self, cache: FrameCache, keys: list[str]) -> list[EncodedVideo]:
        """Units (L2-normalised) and, for models with a score, the packed tensor of each video."""
        features = dict(clip_frame_features(self.clip, cache, keys, self.batch_frames, self.device))
        dataset = VideoDataset(keys, features, self.preprocess)
        batch = collate_videos([dataset[i] for i in range(len(keys))]).to(self.device)
        packed = self.model.encode_videos(batch).float()
        moments = self.model.moment_units(batch, [len(features[key]) for key in keys])
        units = F.normalize(packed[:, moments.rows.to(packed.device)], dim=-1).cpu()
        encoded = []
        for row in range(len(keys)):
            windows = moments.windows[row].cpu()
            present = ~torch.isnan(windows[:, 0])
            packed_row = packed[row].cpu().numpy() if self.score_fn is not None else None
            encoded.append(EncodedVideo(units[row, present].numpy(), windows[present].numpy(), packed_row))
        return encoded

    @torch.inference_mode()
    def encode_queries(self, texts: list[str]) -> Tensor:
        tokens = query_features(self.clip, texts, self.device)
        names = [str(i) for i in range(len(texts))]
        dataset = QueryDataset(names, dict(zip(names, tokens, strict=True)), self.preprocess)
        batch = collate_queries([dataset[i] for i in range(len(texts))]).to(self.device)
        return self.model.encode_queries(batch).float().cpu()


def load_search_model(choice: ModelChoice, device_name: str = "auto", batch_frames: int = 256) -> SearchModel:
    """Load the trained model of `choice` from its path (a clear error when its checkpoint or CLIP file is missing,
    or when its input sizes are not the CLIP's); `batch_frames` frames per CLIP forward for feature models."""
    spec = model_spec(choice.name)
    device = resolve_device(device_name)
    if spec.trainable and (choice.checkpoint is None or not Path(choice.checkpoint).exists()):
        raise PipelineError(
            f"no trained {choice.name} at {choice.checkpoint}: train it (`dvc repro`) or give --checkpoint PATH"
        )
    if spec.inputs == "frames":
        fallback = BaseConfig(clip_weights=choice.clip_weights)  # all that loading reads of `base`
        model, _ = load_trained_propy(fallback, device, choice.checkpoint)
        clip_sha256 = load_checkpoint(choice.checkpoint).get("clip_sha256")  # what loading checked the CLIP against
        return PropySearchModel(model, choice, clip_sha256, device)
    if not Path(choice.clip_weights).is_file():
        raise PipelineError(f"CLIP weights {choice.clip_weights} do not exist (base.clip_weights)")
    clip, arch = load_clip(choice.clip_weights)
    identity: dict[str, Any] = {"model": choice.name, "clip_sha256": file_sha256(choice.clip_weights)}
    if spec.trainable:
        model, config, _ = load_baseline(choice.checkpoint, choice.name)
        sizes = (config.visual_input_size, config.query_input_size)
        if sizes != (arch.embed_dim, arch.embed_dim):
            raise PipelineError(
                f"{choice.checkpoint} reads features of sizes (video, text) {sizes}; the CLIP {choice.clip_weights} "
                f"gives {arch.embed_dim} (set base.clip_weights to the CLIP it was trained on)"
            )
        identity.update(
            weights_sha256=file_sha256(Path(choice.checkpoint) / "model.safetensors"),
            config=dataclasses.asdict(config),
        )
    else:
        model = build_model(choice.name)
        identity.update(weights_sha256=None, config=dataclasses.asdict(model.preprocess_config()))
    return FeatureSearchModel(choice.name, model, clip, json.loads(json.dumps(identity)), device, batch_frames)
