"""Frozen CLIP backbone: an open_clip ViT (QuickGELU, OpenAI layout) built offline from a local weights file.

The weights file describes its own architecture: widths, depths, patch size, resolution, vocabulary and context
length are read from the tensor shapes, so the real OpenAI ViT-B/32 and the tiny synthetic CLIP load the same way.
Accepted files: safetensors, or a plain state dict saved with `torch.save` (loaded with `weights_only=True`).
The original OpenAI TorchScript archive is turned into a plain file once with `convert_torchscript`.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file, save_file

from stages.data.errors import PipelineError
from stages.data.files import file_sha256

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


@dataclass(frozen=True)
class ClipArch:
    """Architecture of an OpenAI-layout CLIP ViT (defaults: ViT-B/32 at 224 px)."""

    embed_dim: int = 512
    vision_width: int = 768
    vision_layers: int = 12
    patch_size: int = 32
    image_size: int = 224
    text_width: int = 512
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408

    @property
    def vision_heads(self) -> int:
        """Attention heads of the vision tower (width / 64, as in OpenAI CLIP)."""
        return max(1, self.vision_width // HEAD_WIDTH)

    @property
    def text_heads(self) -> int:
        """Attention heads of the text tower (width / 64, as in OpenAI CLIP)."""
        return max(1, self.text_width // HEAD_WIDTH)

    @property
    def tokens_per_frame(self) -> int:
        """CLS plus the patch grid."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def name(self) -> str:
        """Short name used in file names, e.g. `vit-b-32` or `vit-w128-l2-p32-r64`."""
        if self == ClipArch():
            return "vit-b-32"
        return f"vit-w{self.vision_width}-l{self.vision_layers}-p{self.patch_size}-r{self.image_size}"

    def build(self) -> CLIP:
        """A randomly initialised open_clip CLIP with QuickGELU (what the OpenAI weights need)."""
        vision = CLIPVisionCfg(
            layers=self.vision_layers,
            width=self.vision_width,
            head_width=self.vision_width // self.vision_heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
        )
        text = CLIPTextCfg(
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            width=self.text_width,
            heads=self.text_heads,
            layers=self.text_layers,
        )
        return CLIP(embed_dim=self.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def arch_from_state_dict(state: dict[str, torch.Tensor]) -> ClipArch:
    """Read the architecture off an OpenAI-layout state dict."""
    try:
        vision_width = state["visual.conv1.weight"].shape[0]
        patch_size = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return ClipArch(
            embed_dim=state["text_projection"].shape[1],
            vision_width=vision_width,
            vision_layers=_count_blocks(state, "visual.transformer.resblocks."),
            patch_size=patch_size,
            image_size=patch_size * grid,
            text_width=state["ln_final.weight"].shape[0],
            text_layers=_count_blocks(state, "transformer.resblocks."),
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
        )
    except KeyError as exc:
        raise PipelineError(f"not an OpenAI-layout CLIP ViT state dict: key {exc} is missing") from exc


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from a safetensors file or a plain `torch.save` state dict, never unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"CLIP weights file {path} does not exist; expected a safetensors or plain state-dict file "
            "(convert the OpenAI TorchScript archive once with `python pipeline.py convert-weights`)"
        )
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if _is_torchscript(path):
        raise PipelineError(
            f"{path} is a TorchScript archive (the original OpenAI download); convert it once with "
            f"`python pipeline.py convert-weights {path} OUT.safetensors`"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is not what we expect
        raise PipelineError(f"{path} is not a safetensors or plain state-dict file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path} does not hold a dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_clip(path: str | Path, expected_sha256: str | None = None) -> tuple[CLIP, ClipArch]:
    """Build the CLIP described by a weights file and load it (fp32, eval mode, every parameter frozen)."""
    if expected_sha256 and Path(path).is_file():
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise PipelineError(f"{path}: sha256 is {actual}, expected {expected_sha256}")
    state = {k: v for k, v in load_state_dict_file(path).items() if k not in _NON_WEIGHT_KEYS}
    arch = arch_from_state_dict(state)
    model = arch.build()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise PipelineError(
            f"{path} does not match a CLIP ViT {asdict(arch)}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval().requires_grad_(False)
    return model, arch


def save_clip(model: CLIP, path: str | Path) -> str:
    """Write a CLIP state dict as safetensors (atomically) and return its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in _NON_WEIGHT_KEYS}
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return file_sha256(path)


def convert_torchscript(src: str | Path, dst: str | Path) -> str:
    """Turn the OpenAI TorchScript archive (`ViT-B-32.pt`) into a plain safetensors file; return its sha256."""
    src = Path(src)
    if not src.is_file():
        raise PipelineError(f"{src} does not exist")
    try:
        archive = torch.jit.load(str(src), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a non-TorchScript file fails in many ways
        raise PipelineError(f"{src} is not a TorchScript archive: {exc}") from exc
    state = {k: v for k, v in archive.state_dict().items() if k not in _NON_WEIGHT_KEYS}
    arch_from_state_dict(state)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, dst)
    return file_sha256(dst)


_TOKENIZER: SimpleTokenizer | None = None


def tokenize(texts: list[str], max_words: int) -> torch.Tensor:
    """Official ProPy/CLIP4Clip tokenisation: [SOT] + BPE tokens + [EOT], at most `max_words` ids per caption,
    zero-padded to the longest caption of the batch. EOT is the largest id, so argmax finds it."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    sot, eot = _TOKENIZER.encoder["<start_of_text>"], _TOKENIZER.encoder["<end_of_text>"]
    rows = [[sot, *_TOKENIZER.encode(text)[: max_words - 2], eot] for text in texts]
    ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def text_token_features(model: CLIP, text_ids: torch.Tensor) -> torch.Tensor:
    """Last-layer token features of the frozen text tower: ln_final then the projection at every position.

    `text_ids` [N, L] (L <= context length, zero padded as `tokenize` makes them); returns [N, L, embed_dim]. The
    row at the EOT position (argmax of the ids) equals `model.encode_text`'s query feature.
    """
    length = text_ids.shape[1]
    x = model.token_embedding(text_ids) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    return model.ln_final(x) @ model.text_projection


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [..., H, W, 3] (on any device) to CLIP-normalised float [..., 3, H, W]."""
    x = frames.movedim(-1, -3).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def open_clip_version() -> str:
    """The installed open_clip version (recorded in artefact provenance)."""
    return open_clip.__version__
