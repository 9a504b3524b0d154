"""ProPy matches the official code on its fixtures (both paths, both pyramid forms), and its defects, loss,
parameters, checkpoints and importer behave as documented."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline import cli
from stages.data.errors import PipelineError
from stages.models import build_model
from stages.models.clip_backbone import ClipArch, file_sha256, load_clip
from stages.models.propy import PRESETS, ProPy, ProPyConfig, propy_loss
from stages.models.propy_import import (
    build_from_official,
    check_reference,
    export_official_clip,
    load_official_state,
    load_propy,
    propy_reference_check,
)
from stages.models.pyramid import PyramidConfig
from stages.models.reference import TOLERANCE

TINY_PYRAMID = PyramidConfig(num_frames=8, kernel_stride=((2, 2), (2, 1), (3, 1)))


@pytest.fixture(scope="module")
def official(fixtures_dir):
    folder = fixtures_dir / "propy_official"
    return {
        "config": folder / "cfg32_config.json",
        "offset_config": folder / "cfg32_offset_config.json",
        "ckpt": folder / "cfg32_official_ckpt.pth.tar",
        "io": folder / "cfg32_io.npz",
    }


@pytest.fixture(scope="module")
def official_model(official) -> ProPy:
    model, _ = build_from_official(load_official_state(official["ckpt"]), PyramidConfig())
    return model


@pytest.mark.parametrize("config_key", ["config", "offset_config"])
def test_fixture_outputs_match_official(official, config_key) -> None:
    errors = check_reference(official[config_key], official["ckpt"], official["io"])
    names = ("text_features", "event_features", "logits", "loss", "t2v_loss", "v2t_loss", "attn_weights", "best_event")
    assert set(errors) == {prefix + name for prefix in ("", "faithful_") for name in names}
    assert max(errors.values()) <= TOLERANCE, errors


def test_postfix_prompts_are_dead_unless_fixed(official_model) -> None:
    ids = torch.tensor([[998, 5, 7, 9, 999, 0, 0], [998, 11, 999, 0, 0, 0, 0]])
    for fixed in (False, True):
        model = ProPy(official_model.clip, official_model.arch, ProPyConfig(postfix_fix=fixed)).eval()
        with torch.no_grad():
            before = model.encode_queries(ids)
            model.postfix_proj.weight.add_(torch.randn_like(model.postfix_proj.weight))
            after = model.encode_queries(ids)
            assert torch.equal(before, after) != fixed
            model.prefix_proj.bias.add_(torch.randn_like(model.prefix_proj.bias))  # prefix prompts always matter
            assert not torch.allclose(after, model.encode_queries(ids))


def test_postfix_fix_gradient_reaches_postfix_projection(official_model) -> None:
    ids = torch.tensor([[998, 5, 7, 999, 0]])
    for fixed in (False, True):
        model = ProPy(official_model.clip, official_model.arch, ProPyConfig(postfix_fix=fixed))
        model.encode_queries(ids).sum().backward()
        assert (model.postfix_proj.weight.grad.abs().sum() > 0) == fixed
        assert model.prefix_proj.weight.grad.abs().sum() > 0


def test_loss_formulas_with_uneven_captions() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.5], [2.0, 2.5, 0.0], [0.1, 0.2, 4.0], [1.0, 0.0, 2.0], [0.3, 0.7, 1.5]])
    labels = torch.tensor([0, 0, 2, 2, 1])
    loss, t2v, v2t = propy_loss(logits, labels)
    expected_t2v = sum(
        math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels, strict=True)
    )
    columns = logits.T.tolist()
    expected_v2t = sum(
        math.log(sum(math.exp(v) for v in col))
        - math.log(sum(math.exp(col[t]) for t in range(len(labels)) if labels[t] == video))
        for video, col in enumerate(columns)
    )
    assert t2v.item() == pytest.approx(expected_t2v / 5, rel=1e-6)
    assert v2t.item() == pytest.approx(expected_v2t / 3, rel=1e-6)
    assert loss.item() == pytest.approx((t2v.item() + v2t.item()) / 2)
    with pytest.raises(ValueError, match="at least one caption"):
        propy_loss(logits, torch.tensor([0, 0, 0, 0, 1]))


def test_activitynet_evaluation_defect_is_an_option(official_model) -> None:
    queries = torch.randn(4, 48)
    videos = torch.randn(3, 42, 48) * torch.linspace(0.5, 3.0, 42)[None, :, None]
    scale = official_model.clip.logit_scale.exp()
    normalised = scale * torch.einsum(
        "td,bed->tbe", torch.nn.functional.normalize(queries, dim=-1), torch.nn.functional.normalize(videos, dim=-1)
    ).amax(-1)
    raw = scale * torch.einsum("td,bed->tbe", torch.nn.functional.normalize(queries, dim=-1), videos).amax(-1)
    defect = ProPy(official_model.clip, official_model.arch, ProPyConfig.preset("official_activitynet"))
    torch.testing.assert_close(defect.eval().similarity(queries, videos), raw)
    torch.testing.assert_close(defect.train().similarity(queries, videos), normalised)  # training always normalises
    torch.testing.assert_close(official_model.eval().similarity(queries, videos), normalised)


def test_clip_is_shared_frozen_and_gradients_reach_every_trainable_part(official_model, official) -> None:
    model = ProPy(official_model.clip, official_model.arch, replace(official_model.config, postfix_fix=True))
    model.load_trainable_state_dict(official_model.trainable_state_dict())  # non-zero adapters
    assert model.clip is official_model.clip
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert not any(name.startswith("clip.") for name in model.trainable_state_dict())
    video = torch.randn(2, 32, 3, 64, 64)
    ids = torch.tensor([[998, 5, 7, 999], [998, 9, 999, 0], [998, 3, 4, 999]])
    logits = model.similarity(model.encode_queries(ids), model.encode_videos(video))
    propy_loss(logits, torch.tensor([0, 1, 1]))[0].backward()
    assert all(p.grad is None for p in model.clip.parameters())
    last_adapter = f"adapters.{model.arch.vision_layers - 1}."  # dead: the last layer's frame outputs are unused
    for name, param in model.named_parameters():
        if not name.startswith(("clip.", last_adapter)):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif name.startswith(last_adapter):
            assert param.grad is None, name


def test_trainable_parameter_count_of_the_paper_model() -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = ProPy(ClipArch().build(), ClipArch(), ProPyConfig())
        charades = ProPy(model.clip, ClipArch(), ProPyConfig(adapter_kernel=3))
    assert sum(v.numel() for v in model.trainable_state_dict().values()) == 7_975_936  # official table, k_t = 5
    assert sum(v.numel() for v in charades.trainable_state_dict().values()) == 7_975_936 - 12 * 384 * 2
    assert model.proposals.shape == (42, 2) and model.fast_mask.shape == (42, 42 + 4 + 50 * 32)


def test_attention_maps_on_request_leave_features_unchanged(official_model) -> None:
    video = torch.randn(1, 32, 3, 64, 64)
    with torch.no_grad():
        plain = official_model.encode_videos(video)
        features, maps = official_model.forward_visual(video, need_weights=True)
    torch.testing.assert_close(features, plain, rtol=0, atol=1e-5)
    assert maps.shape == (2, 1, 42, 42 + 4 + 5 * 32)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 1, 42))
    frame_columns = maps[..., 46:].unflatten(-1, (5, 32))  # token-major: [token, frame]
    outside = ~torch.from_numpy(official_model.pyramid.event_frame_allowed)[None, None, :, None, :]
    assert frame_columns.masked_select(outside.expand_as(frame_columns)).abs().max() == 0


def test_import_checkpoint_cli_roundtrip(official, official_model, tmp_path) -> None:
    dst = tmp_path / "propy_imported.pt"
    pyramid_json = tmp_path / "cfg_32.json"
    pyramid_json.write_text(json.dumps({"Nf": 32, "offset": [0, 1, 1, 1, 1]}))
    result = CliRunner().invoke(
        cli, ["import-checkpoint", str(official["ckpt"]), str(dst), "--pyramid", str(pyramid_json)]
    )
    assert result.exit_code == 0, result.output
    clip_file = dst.with_suffix(".clip.safetensors")
    payload = torch.load(dst, weights_only=True)
    assert payload["model"] == "propy" and payload["clip_sha256"] == file_sha256(clip_file)
    assert json.loads(json.dumps(payload["model_config"]))["pyramid"]["offset"] == [0, 1, 1, 1, 1]
    model = load_propy(dst, clip_file)
    video = torch.randn(1, 32, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_videos(video), official_model.encode_videos(video))
    # the CLIP part alone, for users without a separate CLIP file; a wrong CLIP file is refused
    digest = export_official_clip(official["ckpt"], tmp_path / "clip.safetensors")
    assert digest == file_sha256(tmp_path / "clip.safetensors")
    load_clip(tmp_path / "clip.safetensors", expected_sha256=digest)
    again = CliRunner().invoke(
        cli, ["import-checkpoint", str(official["ckpt"]), str(tmp_path / "b.pt"), "--clip-weights", str(clip_file)]
    )
    assert again.exit_code == 0, again.output
    other = tmp_path / "other.safetensors"
    from stages.models.clip_backbone import save_clip

    save_clip(official_model.arch.build(), other)
    wrong = CliRunner().invoke(
        cli, ["import-checkpoint", str(official["ckpt"]), str(tmp_path / "c.pt"), "--clip-weights", str(other)]
    )
    assert wrong.exit_code == 1 and "is not the CLIP of" in wrong.output


def test_wrong_pyramid_for_a_checkpoint_is_refused(official) -> None:
    with pytest.raises(PipelineError, match="event prompts"):
        build_from_official(load_official_state(official["ckpt"]), TINY_PYRAMID)


def test_registry_presets_and_params_yaml(tiny_clip_weights) -> None:
    clip, arch = load_clip(tiny_clip_weights)
    model = build_model("propy", clip=clip, arch=arch, config=ProPyConfig(pyramid=TINY_PYRAMID))
    assert isinstance(model, ProPy) and model.proposals.shape == (8, 2)
    assert ProPyConfig.preset("dgl_mil").frame_update == "attn_whole"
    assert {ProPyConfig.preset(f"table9_{row}") for row in "abcdefgh"}.__len__() == 8
    assert ProPyConfig.preset("table9_h") == ProPyConfig.preset("propy") == ProPyConfig()
    assert set(PRESETS) >= {"propy", "dgl_mil", "official_activitynet", "fixed"}
    with pytest.raises(PipelineError, match="unknown ProPy preset"):
        ProPyConfig.preset("nope")
    with pytest.raises(PipelineError, match="odd"):
        ProPyConfig(adapter_kernel=4)
    section = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["train_propy"]["model"]
    assert set(section) == set(ProPyConfig().to_dict())  # every knob is listed (and documented) in params.yaml
    assert ProPyConfig.from_dict(section).pyramid.num_frames == section["pyramid"]["num_frames"]
    assert ProPyConfig.from_dict(ProPyConfig.preset("dgl_mil").to_dict()) == ProPyConfig.preset("dgl_mil")


def test_any_official_shape_imports(tmp_path) -> None:
    """An official-layout checkpoint of another shape (3 layers, Nvp 2, kernel 5, Nf 8 offset pyramid) round-trips."""
    torch.manual_seed(0)
    arch = ClipArch(embed_dim=24, vision_width=64, vision_layers=3, patch_size=16, image_size=32, text_width=64,
                    text_layers=2, context_length=16, vocab_size=50)  # fmt: skip
    pyramid = PyramidConfig(num_frames=8, offset=(1, 1, 1))
    ours = ProPy(arch.build(), arch, ProPyConfig(pyramid=pyramid, num_visual_prompts=2, adapter_channels=8))
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.normal_(0, 0.2)
    layers, nvp, width = 3, 2, 64
    state = {f"clip.{k}": v for k, v in ours.clip.state_dict().items() if k != "attn_mask"}
    state["clip.visual.global_prompts"] = ours.event_prompts.detach()[None]
    state["clip.visual_prompt_embedding"] = ours.visual_prompts.detach().transpose(0, 1).reshape(1, nvp, layers * width)
    for name, value in ours.trainable_state_dict().items():
        if name.startswith(("prefix_proj", "postfix_proj")):
            state[f"clip.{name}"] = value
        elif name.startswith("adapters."):
            block, rest = name.removeprefix("adapters.").split(".", 1)
            state[f"clip.visual.transformer.resblocks.{block}.temp_adapter.{rest}"] = value
    torch.save(
        {"state_dict": state, "epoch": 1, "global_step": 0, "arch": "CLIP4Clip"}, tmp_path / "x_official_ckpt.pth.tar"
    )
    config = {"pyr_config": {"Nf": 8, "offset": [1, 1, 1]}, "Nvp": nvp, "temp_kernel_sz": 5, "vision_layers": layers}
    (tmp_path / "x_config.json").write_text(json.dumps(config))
    video = torch.randn(2, 8, 3, 32, 32)
    ids = torch.tensor([[48, 3, 4, 49], [48, 7, 49, 0], [48, 9, 10, 49]])
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        text, (events, maps) = ours.encode_queries(ids), ours.forward_visual(video, need_weights=True)
        logits, best = ours.similarity(text, events, return_best_event=True)
    copies = ours.prompt_copies  # the official maps hold every copy: spread each prompt's weight evenly over them
    ne = ours.pyramid.num_events
    official_maps = torch.cat(
        [maps[..., :ne], (maps[..., ne : ne + nvp] / copies).repeat_interleave(copies, -1), maps[..., ne + nvp :]], -1
    )
    loss, t2v, v2t = propy_loss(logits, labels)
    arrays = {"video": video, "text_ids": ids, "text_labels": labels, "text_features": text, "event_features": events,
              "logits": logits, "best_event": best, "loss": loss, "t2v_loss": t2v, "v2t_loss": v2t,
              "attn_weights": official_maps}  # fmt: skip
    np.savez(tmp_path / "x_io.npz", **{k: v.numpy() for k, v in arrays.items()})
    errors = propy_reference_check(str(tmp_path / "x"))
    assert max(errors.values()) <= TOLERANCE, errors
    config["Nvp"] = 4
    (tmp_path / "x_config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="Nvp=4"):
        propy_reference_check(str(tmp_path / "x"))
