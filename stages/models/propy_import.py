"""Official ProPy checkpoints (BUAAPY/ProPy `ckpt.pth.tar`): import, CLIP export and the reference check.

    python pipeline.py import-checkpoint ckpt.best.pth.tar models/propy_tvr.pt --pyramid cfg_32.json
    python pipeline.py evaluate propy --checkpoint models/propy_tvr.pt              # score the imported model
    python pipeline.py verify-reference propy $PRVR_FIXTURES/propy_official/cfg32   # the official-code fixtures
    python pipeline.py verify-reference propy $PRVR_FIXTURES/propy_official/cfg32 --checkpoint ours.pt  # an import

An official checkpoint holds the whole model under `clip.` (frozen CLIP included) and no pyramid (the masks are
rebuilt from the `pyr_configs/*.json` given at load time). Prompt counts, adapter width and kernel are read off the
tensor shapes; the pyramid must be supplied and must give the checkpoint's number of event prompts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.data.checkpoint import load_checkpoint, save_checkpoint
from stages.data.errors import PipelineError
from stages.models.clip_backbone import ClipArch, arch_from_state_dict, file_sha256, load_clip, save_clip
from stages.models.propy import ProPy, ProPyConfig, propy_loss
from stages.models.pyramid import PyramidConfig
from stages.models.reference import register_reference_check

_ADAPTER = ".temp_adapter."
_PROPY_KEYS = ("visual.global_prompts", "visual_prompt_embedding", "prefix_proj.", "postfix_proj.")


def load_official_state(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of an official ProPy file (`torch.load(weights_only=True)`), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"official ProPy checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is not what we expect
        raise PipelineError(f"{path} is not a loadable official ProPy checkpoint: {exc}") from exc
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, dict) or "clip.visual.global_prompts" not in state:
        raise PipelineError(
            f"{path} has no official ProPy `state_dict` (expected keys like clip.visual.global_prompts)"
        )
    return payload


def split_official_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an official `state_dict` into the frozen CLIP (open_clip/OpenAI names) and our trainable names."""
    state = {key.removeprefix("module.").removeprefix("clip."): value.float() for key, value in state.items()}
    clip_state = {k: v for k, v in state.items() if _ADAPTER not in k and not k.startswith(_PROPY_KEYS)}
    layers, width = _count_layers(clip_state), state["visual.global_prompts"].shape[-1]
    nvp, prompt_width = state["visual_prompt_embedding"].shape[1:]
    if prompt_width != layers * width:
        raise PipelineError(
            f"official checkpoint has visual prompts for {prompt_width // width} of {layers} vision layers; "
            "ProPy needs deep prompts in every layer (num_prompt_layers = vision layers)"
        )
    trainable = {
        "event_prompts": state["visual.global_prompts"].reshape(-1, width),
        "visual_prompts": state["visual_prompt_embedding"].reshape(nvp, layers, width).transpose(0, 1).contiguous(),
    }
    for name in ("prefix_proj", "postfix_proj"):
        for part in ("weight", "bias"):
            trainable[f"{name}.{part}"] = state[f"{name}.{part}"]
    for key, value in state.items():
        if _ADAPTER in key:
            block, rest = key.removeprefix("visual.transformer.resblocks.").split(_ADAPTER)
            trainable[f"adapters.{block}.{rest}"] = value
    return clip_state, trainable


def official_name(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One of our trainable tensors (or its optimiser moments) under its official name and shape (the inverse of
    `split_official_state`): e.g. `visual_prompts` [layers, Nvp, W] -> `clip.visual_prompt_embedding` [1, Nvp,
    layers*W]."""
    if name == "event_prompts":
        return "clip.visual.global_prompts", value.unsqueeze(0)
    if name == "visual_prompts":
        layers, nvp, width = value.shape
        return "clip.visual_prompt_embedding", value.transpose(0, 1).reshape(1, nvp, layers * width)
    if name.startswith("adapters."):
        block, rest = name.removeprefix("adapters.").split(".", 1)
        return f"clip.visual.transformer.resblocks.{block}{_ADAPTER}{rest}", value
    return f"clip.{name}", value


def _count_layers(clip_state: dict[str, torch.Tensor]) -> int:
    prefix = "visual.transformer.resblocks."
    return len({k[len(prefix) :].split(".")[0] for k in clip_state if k.startswith(prefix)})


def config_from_official(
    trainable: dict[str, torch.Tensor], pyramid: PyramidConfig, official: dict[str, Any] | None = None
) -> ProPyConfig:
    """Our config for an official model: dimensions from the tensors, cross-checked with an official config dict
    (the fixture `*_config.json` keys Nvp, adapter_channels, temp_kernel_sz, Ne, num_*_layers) when given."""
    adapter = trainable.get("adapters.0.conv.weight")
    if adapter is None:
        raise PipelineError("official ProPy checkpoint has no temporal adapters (temp_adapter.*)")
    config = ProPyConfig(
        pyramid=pyramid,
        num_visual_prompts=trainable["visual_prompts"].shape[1],
        adapter_channels=adapter.shape[0],
        adapter_kernel=adapter.shape[2],
    )
    layers = trainable["visual_prompts"].shape[0]
    stated = {
        "Nvp": config.num_visual_prompts,
        "adapter_channels": config.adapter_channels,
        "temp_kernel_sz": config.adapter_kernel,
        "Ne": trainable["event_prompts"].shape[0],
        "num_prompt_layers": layers,
        "num_adapter_layers": len({k.split(".")[1] for k in trainable if k.startswith("adapters.")}),
    }
    for key, value in (official or {}).items():
        if key in stated and int(value) != stated[key]:
            raise PipelineError(f"official config says {key}={value} but the checkpoint tensors give {stated[key]}")
    if stated["num_adapter_layers"] != layers:
        raise PipelineError(f"checkpoint has adapters in {stated['num_adapter_layers']} of {layers} layers")
    return config


def build_from_official(
    payload: dict[str, Any], pyramid: PyramidConfig, official: dict[str, Any] | None = None, **overrides: Any
) -> tuple[ProPy, dict[str, torch.Tensor]]:
    """Our ProPy (eval mode) loaded with an official checkpoint's weights, and the CLIP part of the state."""
    clip_state, trainable = split_official_state(payload["state_dict"])
    arch = arch_from_state_dict(clip_state)
    _check_arch(arch, official or {})
    clip = arch.build()
    clip.load_state_dict(clip_state, strict=True)
    config = replace(config_from_official(trainable, pyramid, official), **overrides)
    model = ProPy(clip, arch, config)
    if model.pyramid.num_events != trainable["event_prompts"].shape[0]:
        raise PipelineError(
            f"pyramid {pyramid} has {model.pyramid.num_events} events but the checkpoint has "
            f"{trainable['event_prompts'].shape[0]} event prompts; give the pyramid JSON it was trained with"
        )
    model.load_trainable_state_dict(trainable)
    return model.eval(), clip_state


def _check_arch(arch: ClipArch, official: dict[str, Any]) -> None:
    stated = {
        "vision_width": arch.vision_width,
        "vision_layers": arch.vision_layers,
        "vision_heads": arch.vision_heads,
        "text_width": arch.text_width,
        "text_layers": arch.text_layers,
        "text_heads": arch.text_heads,
        "patch_size": arch.patch_size,
        "image_resolution": arch.image_size,
        "embed_dim": arch.embed_dim,
        "context_length": arch.context_length,
        "vocab_size": arch.vocab_size,
    }
    wrong = {k: (official[k], v) for k, v in stated.items() if k in official and int(official[k]) != v}
    if wrong:
        raise PipelineError(f"official config and checkpoint disagree (config, tensors): {wrong}")


def read_official_pyramid(path: str | Path | None) -> PyramidConfig:
    """The pyramid of an official `pyr_configs/*.json` file (None: the paper's default, cfg_32)."""
    if path is None:
        return PyramidConfig()
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read pyramid config {path}: {exc}") from exc
    return PyramidConfig.from_official(data, str(path))


def import_official_checkpoint(
    src: str | Path,
    dst: str | Path,
    pyramid_json: str | Path | None = None,
    clip_weights: str | Path | None = None,
    clip_out: str | Path | None = None,
) -> dict[str, str]:
    """Convert an official checkpoint into ours (trainable parameters + model config + CLIP sha256 reference).

    The CLIP reference is `clip_weights` (an existing weights file, checked to hold exactly the checkpoint's CLIP
    tensors) or, without it, a weights file written from the checkpoint's frozen CLIP to `clip_out` (default:
    DST with suffix `.clip.safetensors`). `pyramid_json` is the official pyramid file the model was trained with
    (default: cfg_32). Returns the paths and sha256 written.
    """
    payload = load_official_state(src)
    model, clip_state = build_from_official(payload, read_official_pyramid(pyramid_json))
    if clip_weights is not None:
        reference, _ = load_clip(clip_weights)
        ours = reference.state_dict()
        differs = [k for k, v in clip_state.items() if k not in ours or not torch.equal(ours[k], v)]
        if differs:
            raise PipelineError(f"{clip_weights} is not the CLIP of {src} (tensors differ: {differs[:3]})")
        clip_path, digest = Path(clip_weights), file_sha256(clip_weights)
    else:
        clip_path = Path(clip_out) if clip_out else Path(dst).with_suffix(".clip.safetensors")
        digest = save_clip(model.clip, clip_path)
    save_checkpoint(
        dst,
        {
            "model": "propy",
            "model_config": model.config.to_dict(),
            "clip_arch": asdict(model.arch),
            "clip_sha256": digest,
            "clip_weights": str(clip_path),
            "trainable": model.trainable_state_dict(),
            "epoch": int(payload.get("epoch", 0)),
            "step": int(payload.get("global_step", 0)),
            "extra": {"imported_from": str(src)},
        },
    )
    return {"checkpoint": str(dst), "clip_weights": str(clip_path), "clip_sha256": digest}


def export_official_clip(src: str | Path, dst: str | Path) -> str:
    """Write the frozen CLIP of an official checkpoint as a weights file that `load_clip` reads; return its sha256."""
    clip_state, _ = split_official_state(load_official_state(src)["state_dict"])
    clip = arch_from_state_dict(clip_state).build()
    clip.load_state_dict(clip_state, strict=True)
    return save_clip(clip, dst)


def load_propy(checkpoint: str | Path, clip_weights: str | Path | None = None, **overrides: Any) -> ProPy:
    """A ProPy (eval mode) from one of our checkpoints and its CLIP weights file (sha256 checked).

    The CLIP is `clip_weights` or, without it, the file recorded in the checkpoint (`import-checkpoint` records the
    one it wrote or checked). `overrides` replace fields of the saved model config (e.g. `fast_path=False`).
    """
    return propy_from_payload(load_checkpoint(checkpoint), checkpoint, clip_weights, **overrides)


def propy_from_payload(
    payload: dict[str, Any], checkpoint: str | Path, clip_weights: str | Path | None = None, **overrides: Any
) -> ProPy:
    """`load_propy` of a checkpoint already read (`payload`, read from `checkpoint`)."""
    if payload.get("model") != "propy":
        raise PipelineError(f"{checkpoint} holds model {payload.get('model')!r}, not propy")
    clip_weights = clip_weights or payload.get("clip_weights")
    if clip_weights is None:
        raise PipelineError(f"{checkpoint} records no CLIP weights file; give the one it was trained on")
    if not Path(clip_weights).is_file():
        raise PipelineError(f"CLIP weights {clip_weights} (for {checkpoint}) do not exist")
    clip, arch = load_clip(clip_weights, expected_sha256=payload.get("clip_sha256"))
    config = ProPyConfig.from_dict(payload["model_config"], f"{checkpoint}:model_config")
    model = ProPy(clip, arch, replace(config, **overrides))
    model.load_trainable_state_dict(payload["trainable"])
    return model.eval()


def check_reference(
    config_path: str | Path, checkpoint_path: str | Path, io_path: str | Path, model_file: str | Path | None = None
) -> dict[str, float]:
    """Max abs errors of our port against an official fixture, for the fast path and (`faithful_*`) the official
    computation: text_features, event_features, logits, loss/t2v_loss/v2t_loss, attn_weights (official copies of
    each visual prompt summed) and best_event (fraction of differing argmax events).

    The model is built from the fixture's official checkpoint, or from `model_file`, one of our checkpoints (e.g. the
    output of `import-checkpoint` on that official file, with the CLIP file it records).
    """
    official = json.loads(Path(config_path).read_text())
    pyramid = PyramidConfig.from_official(official.get("pyr_config"), f"{config_path}:pyr_config")
    io = {key: torch.from_numpy(value) for key, value in np.load(io_path).items()}
    if model_file is None:
        payload = load_official_state(checkpoint_path)

        def build(fast: bool) -> ProPy:
            return build_from_official(payload, pyramid, official, fast_path=fast)[0]

    else:
        saved = load_checkpoint(model_file)

        def build(fast: bool) -> ProPy:
            return propy_from_payload(saved, model_file, fast_path=fast)

    errors: dict[str, float] = {}
    for fast in (True, False):
        model = build(fast)
        with torch.no_grad():
            text = model.encode_queries(io["text_ids"])
            events = model.encode_videos(io["video"])
            _, maps = model.forward_visual(io["video"], need_weights=True)
            logits, best = model.similarity(text, events, return_best_event=True)
            losses = propy_loss(logits, io["text_labels"])
        expected_maps = _sum_official_copies(io["attn_weights"], model)
        prefix = "" if fast else "faithful_"
        outputs = {
            "text_features": (text, io["text_features"]),
            "event_features": (events, io["event_features"]),
            "logits": (logits, io["logits"]),
            "loss": (losses[0], io["loss"]),
            "t2v_loss": (losses[1], io["t2v_loss"]),
            "v2t_loss": (losses[2], io["v2t_loss"]),
            "attn_weights": (maps, expected_maps),
        }
        for name, (ours, theirs) in outputs.items():
            if tuple(ours.shape) != tuple(theirs.shape):
                raise PipelineError(f"{name}: our shape {tuple(ours.shape)} != official {tuple(theirs.shape)}")
            errors[prefix + name] = float((ours.double() - theirs.double()).abs().max())
        errors[prefix + "best_event"] = float((best != io["best_event"]).float().mean())
    return errors


def _sum_official_copies(weights: torch.Tensor, model: ProPy) -> torch.Tensor:
    """Official maps [..., Ne + Nvp*n1 + T*Nf] -> ours [..., Ne + Nvp + T*Nf] (copies of each prompt summed)."""
    ne, nvp, copies = model.pyramid.num_events, model.config.num_visual_prompts, model.prompt_copies
    prompts = weights[..., ne : ne + nvp * copies].unflatten(-1, (nvp, copies)).sum(-1)
    return torch.cat([weights[..., :ne], prompts, weights[..., ne + nvp * copies :]], dim=-1)


@register_reference_check("propy", reads_checkpoint=True)
def propy_reference_check(prefix: str, checkpoint: str | None = None) -> dict[str, float]:
    """The fixture PREFIX_config.json + PREFIX_official_ckpt.pth.tar + PREFIX_io.npz (fixtures README format);
    with `checkpoint`, our model file is checked against the fixture instead of the official one."""
    paths = [Path(f"{prefix}_{suffix}") for suffix in ("config.json", "official_ckpt.pth.tar", "io.npz")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PipelineError(f"reference fixture files missing: {missing}")
    return check_reference(*paths, model_file=checkpoint)
