"""The CLIP backbone loads from plain files, infers its architecture and refuses bad files clearly."""

from __future__ import annotations

import pytest
import torch

from stages.data.errors import PipelineError
from stages.models.clip_backbone import (
    ClipArch,
    arch_from_state_dict,
    convert_torchscript,
    file_sha256,
    load_clip,
    tokenize,
)


def test_vit_b_32_shape_inference() -> None:
    assert arch_from_state_dict(ClipArch().build().state_dict()) == ClipArch()


def test_roundtrip_safetensors_and_state_dict(tiny_clip_weights, tmp_path) -> None:
    model, arch = load_clip(tiny_clip_weights)
    assert (arch.vision_width, arch.image_size, arch.tokens_per_frame) == (128, 64, 5)
    assert not any(p.requires_grad for p in model.parameters())
    pt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, pt)
    again, _ = load_clip(pt)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_missing_and_wrong_files(tmp_path, tiny_clip_weights) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        load_clip(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="not a safetensors or plain state-dict"):
        load_clip(junk)
    with pytest.raises(PipelineError, match="sha256"):
        load_clip(tiny_clip_weights, expected_sha256="0" * 64)
    assert len(file_sha256(tiny_clip_weights)) == 64


def test_torchscript_archive_is_refused_then_converted(tmp_path, tiny_clip_weights) -> None:
    model, _ = load_clip(tiny_clip_weights)
    archive = tmp_path / "ViT-tiny.pt"  # a TorchScript archive holding the whole CLIP, like OpenAI's download
    torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 64, 64)}, check_trace=False).save(str(archive))
    with pytest.raises(PipelineError, match="TorchScript"):
        load_clip(archive)
    digest = convert_torchscript(archive, tmp_path / "plain.safetensors")
    assert digest == file_sha256(tmp_path / "plain.safetensors")
    converted, _ = load_clip(tmp_path / "plain.safetensors")
    for (name, a), (_, b) in zip(model.state_dict().items(), converted.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_tokenize_official_layout() -> None:
    ids = tokenize(["a red circle moves left", "hi"], max_words=5)
    assert ids.shape == (2, 5)
    assert ids[0, 0] == 49406 and ids[0, 4] == 49407  # truncated to max_words, EOT last
    assert ids[1].tolist()[-2:] == [0, 0] and ids[1].argmax() == 2  # zero padding, EOT is the largest id
