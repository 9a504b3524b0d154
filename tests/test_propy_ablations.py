"""Every ablation switch produces the structure the paper describes (which tokens see what, which parameters exist,
which events enter the MIL max), and the fast path gives the official computation's numbers for each of them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stages.data.errors import PipelineError
from stages.models.clip_backbone import ClipArch
from stages.models.propy import ProPy, ProPyConfig
from stages.models.propy_blocks import TemporalAdapter
from stages.models.pyramid import PyramidConfig

ARCH = ClipArch(
    embed_dim=32,
    vision_width=128,
    vision_layers=2,
    patch_size=16,
    image_size=32,
    text_width=64,
    text_layers=2,
    context_length=16,
    vocab_size=100,
)
NF8 = PyramidConfig(num_frames=8, kernel_stride=((2, 2), (2, 1), (3, 1)))  # 4 + 3 + 1 events
NF16 = PyramidConfig(num_frames=16, kernel_stride=((4, 2), (3, 2), (3, 1)))  # paper Table 4, first row
BASE = ProPyConfig(pyramid=NF8, adapter_channels=16, adapter_kernel=3)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return ARCH.build().eval().requires_grad_(False)


def make(clip, fast: bool = True, **changes) -> ProPy:
    """A tiny ProPy whose every trainable tensor is random and non-zero (adapters active), same for both paths."""
    model = ProPy(clip, ARCH, replace(BASE, fast_path=fast, **changes)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def frames_for(model: ProPy, videos: int = 2) -> torch.Tensor:
    return torch.randn(videos, model.pyramid.num_frames, 3, ARCH.image_size, ARCH.image_size, generator=_gen(2))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


ABLATIONS = {
    **{f"interaction_{a}": {"event_interaction": a} for a in ("AD", "A", "D", "P", "C", "PC", "W", "S")},
    **{f"frames_{m}": {"frame_update": m} for m in ("orig", "attn_pyr", "attn_whole", "attn_adapter")},
    "copy_none": {"visual_prompt_copy": "none"},
    "copy_events": {"visual_prompt_copy": "events"},
    "all_frames": {"event_frame_area": "all"},
    "mil_levels_12": {"mil_levels": (1, 2)},
    "pyramid_nf16": {"pyramid": NF16},
    "dgl_mil": {
        k: v for k, v in ProPyConfig.preset("dgl_mil").to_dict().items() if k.startswith(("event", "frame", "visual"))
    },
}


@pytest.mark.parametrize("changes", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_fast_path_matches_official_computation(clip, changes) -> None:
    fast, faithful = make(clip, True, **changes), make(clip, False, **changes)
    frames = frames_for(fast)
    with torch.no_grad():
        torch.testing.assert_close(fast.encode_videos(frames), faithful.encode_videos(frames), rtol=0, atol=1e-5)
        features_fast, maps_fast = fast.forward_visual(frames, need_weights=True)
        features_faithful, maps_faithful = faithful.forward_visual(frames, need_weights=True)
    torch.testing.assert_close(features_fast, features_faithful, rtol=0, atol=1e-5)
    torch.testing.assert_close(maps_fast, maps_faithful, rtol=0, atol=1e-6)


def test_fast_path_and_checkpointing_gradients_match(clip) -> None:
    grads = []
    for fast, checkpointing in ((False, False), (True, False), (True, True)):
        model = make(clip, fast, grad_checkpointing=checkpointing).train()
        model.encode_videos(frames_for(model)).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("area", ["AD", "A", "D", "P", "C", "PC", "W", "S"])
def test_event_attention_follows_interaction_area(clip, area) -> None:
    model = make(clip, event_interaction=area)
    with torch.no_grad():
        _, maps = model.forward_visual(frames_for(model), need_weights=True)
    allowed = torch.from_numpy(model.pyramid.event_interaction(area))
    ne = model.pyramid.num_events
    assert torch.equal(maps[..., :ne] > 0, allowed.expand_as(maps[..., :ne]))
    frames_seen = maps[..., ne + 4 :].unflatten(-1, (ARCH.tokens_per_frame, 8)).sum(-2) > 0  # token-major
    assert torch.equal(frames_seen, torch.from_numpy(model.pyramid.event_frame_allowed).expand_as(frames_seen))


def _changed_events(model: ProPy, event: int) -> np.ndarray:
    frames = frames_for(model)
    change = torch.randn(model.event_prompts.shape[1], generator=_gen(3))  # not constant: LayerNorm would erase it
    with torch.no_grad():
        before = model.forward_visual(frames)[0]
        model.event_prompts[event] += change
        after = model.forward_visual(frames)[0]
        model.event_prompts[event] -= change
    return ((after - before).abs().amax(dim=(0, 2)) > 1e-4).numpy()


@pytest.mark.parametrize("area", ["S", "P", "C", "A", "D"])
def test_information_flows_only_along_the_interaction_area(clip, area) -> None:
    model = make(clip, event_interaction=area, frame_update="orig")
    relation = model.pyramid.event_interaction(area).astype(int)
    reach = (relation @ relation) > 0  # two visual layers: two hops
    for event in (0, 1, 5, 7):  # top, middle (left), bottom (second, last)
        np.testing.assert_array_equal(_changed_events(model, event), reach[:, event], err_msg=f"{area} event {event}")


def test_frame_update_modes_route_events_into_frames(clip) -> None:
    """With no event-event interaction, a bottom event reaches other events only through the frames it updates."""
    bottom = 4  # frames [0, 2)
    for mode, expected in (
        ("adapter", lambda spans: np.arange(8) == bottom),
        ("orig", lambda spans: np.arange(8) == bottom),
        ("attn_pyr", lambda spans: spans[:, 0] < 2),  # events whose segment overlaps frames [0, 2)
        ("attn_adapter", lambda spans: spans[:, 0] < 3),  # the kernel-3 temporal conv also reaches frame 2
        ("attn_whole", lambda spans: np.ones(8, bool)),
    ):
        model = make(clip, event_interaction="S", frame_update=mode)
        np.testing.assert_array_equal(_changed_events(model, bottom), expected(model.pyramid.spans), err_msg=mode)


def test_parameter_sets_per_frame_update(clip) -> None:
    for mode, with_adapters in (
        ("adapter", True),
        ("attn_adapter", True),
        ("orig", False),
        ("attn_pyr", False),
        ("attn_whole", False),
    ):
        names = set(make(clip, frame_update=mode).trainable_state_dict())
        assert any(n.startswith("adapters.") for n in names) == with_adapters, mode
        assert {"event_prompts", "visual_prompts", "prefix_proj.weight", "postfix_proj.weight"} <= names


def test_visual_prompt_copies_are_a_log_count_bias(clip) -> None:
    ne, nvp = 8, 4
    spans = make(clip).pyramid.spans
    for copy, copies, counts in (
        ("l1", 4, (spans[:, 1] - spans[:, 0]) // 2),  # bottom events (2 frames each) inside the segment
        ("events", 8, make(clip).pyramid.event_event_allowed.sum(1)),
        ("none", 1, np.ones(ne, int)),
    ):
        model = make(clip, visual_prompt_copy=copy)
        assert model.prompt_copies == copies
        assert model.faithful_mask.shape[1] == ne + nvp * copies + ARCH.tokens_per_frame * 8
        seen = (model.faithful_mask[:, ne : ne + nvp * copies] == 0).view(ne, nvp, copies).sum(-1)
        assert (seen == torch.from_numpy(counts)[:, None]).all(), copy
        torch.testing.assert_close(model.fast_mask[:, ne : ne + nvp], torch.log(seen.float()))


def test_mil_levels_select_events_and_proposals(clip) -> None:
    model = make(clip, mil_levels=(1, 2))
    full = make(clip)
    frames = frames_for(model)
    with torch.no_grad():
        events = model.encode_videos(frames)
        all_events = full.forward_visual(frames)[0]
        queries = torch.randn(3, 32)
    chosen = np.flatnonzero(model.pyramid.level_of_event <= 2)
    assert events.shape == (2, len(chosen), 32)
    torch.testing.assert_close(events, all_events[:, chosen])
    np.testing.assert_array_equal(model.proposals.numpy(), model.pyramid.proposals[chosen])
    logits, best = model.similarity(queries, events, return_best_event=True)
    expected = full.similarity(queries, all_events[:, chosen])
    torch.testing.assert_close(logits, expected)
    assert best.max() < len(chosen)
    with pytest.raises(PipelineError, match="mil_levels"):
        make(clip, mil_levels=(4,))


def test_dgl_mil_and_table9_presets(clip) -> None:
    dgl = ProPy(clip, ARCH, replace(ProPyConfig.preset("dgl_mil"), pyramid=NF8, adapter_kernel=3))
    assert torch.isfinite(dgl.faithful_mask).all()  # every prompt sees every prompt, frame and visual prompt
    assert dgl.frame_event_mask.all() and len(dgl.adapters) == 0 and dgl.prompt_copies == 1
    rows = {row: ProPyConfig.preset(f"table9_{row}") for row in "abcdefgh"}
    assert (rows["a"].event_interaction, rows["a"].frame_update, rows["a"].visual_prompt_copy) == ("S", "orig", "none")
    assert rows["e"] == ProPyConfig(visual_prompt_copy="none")  # AD + adapter, no replication (= Table 8 no-copy)
    assert rows["f"] == ProPyConfig(frame_update="orig")  # AD + C(L1), no adapter (= Table 6 orig)


def test_adapter_starts_as_identity() -> None:
    adapter = TemporalAdapter(width=16, channels=4, kernel=3)
    x = torch.randn(2 * 8, 5, 16)
    torch.testing.assert_close(adapter(x, num_frames=8), x)
