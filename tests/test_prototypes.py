"""The Prototypes baseline: shapes, scoring, each component switch, the auxiliary losses and a short training run."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.data.config import config_from_dict
from stages.data.errors import PipelineError
from stages.data.schema import Query
from stages.evaluate.efficiency import bytes_per_video
from stages.models import build_model
from stages.models.baselines.data import TrainBatch, VideoBatch, VideoQueryDataset, collate_train
from stages.models.baselines.losses import NegativeSampling
from stages.models.baselines.prototypes import (
    BroadcastDecoder,
    Prototypes,
    PrototypesConfig,
    mix_video_pairs,
)
from stages.models.baselines.prototypes_losses import (
    attention_guidance_loss,
    masked_token_nce,
    orthogonal_loss,
    sample_shared_mask,
    word_positions,
)
from stages.train.baseline_training import BaselineDatasets, BaselineTrainConfig, train_baseline
from tests import baseline_features

TINY = PrototypesConfig(
    visual_input_size=16,
    query_input_size=12,
    hidden_size=32,
    n_heads=4,
    map_size=8,
    max_ctx_l=24,
    max_desc_l=10,
    input_drop=0.0,
    drop=0.0,
    num_prototypes=5,
)
SWITCHES = {"cross_recon": "crecon", "uni_recon": "urecon", "guidance": "attn", "ortho": "ortho"}
RETRIEVAL_TERMS = {"clip_nce", "clip_trip", "frame_nce", "frame_trip"}


def tiny_features(
    num_videos: int, seed: int, split: str = "train"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Query]]:
    return baseline_features.tiny_features(num_videos, seed, TINY.visual_input_size, TINY.query_input_size, split)


def tiny_batch(num_videos: int = 6, seed: int = 0) -> TrainBatch:
    """One training batch of `tiny_features` through the shared dataset and collate."""
    videos, texts, queries = tiny_features(num_videos, seed)
    dataset = VideoQueryDataset(queries, videos, texts, TINY.preprocess())
    return collate_train([dataset[i] for i in range(len(dataset))])


def losses_of(model: Prototypes, batch: TrainBatch, seed: int = 0) -> dict[str, torch.Tensor]:
    return model(batch, NegativeSampling(), torch.Generator().manual_seed(seed))[0]


@pytest.fixture(scope="module")
def batch() -> TrainBatch:
    return tiny_batch()


def test_encode_and_score_shapes(batch: TrainBatch) -> None:
    torch.manual_seed(0)
    model = Prototypes(TINY).eval()
    with torch.no_grad():
        videos = model.encode_videos(batch.videos)
        queries = model.encode_queries(batch.queries)
        scores = model.score(queries, videos)
    num_videos, num_queries = len(batch.videos.video_ids), len(batch.queries.query_ids)
    assert videos.shape == (num_videos, 2 * TINY.num_prototypes, TINY.hidden_size)
    torch.testing.assert_close(videos.norm(dim=-1), torch.ones(videos.shape[:2]))
    assert queries.shape == (num_queries, TINY.hidden_size)
    cosine = F.normalize(queries, dim=-1) @ videos.reshape(-1, TINY.hidden_size).T
    best = cosine.reshape(num_queries, num_videos, 2, TINY.num_prototypes).amax(dim=-1)
    torch.testing.assert_close(scores, 0.7 * best[..., 0] + 0.3 * best[..., 1])


def test_video_encoding_does_not_depend_on_the_other_videos(batch: TrainBatch) -> None:
    model = Prototypes(TINY).eval()
    with torch.no_grad():
        together = model.encode_videos(batch.videos)
        first = batch.videos
        alone = dataclasses.replace(
            first,
            video_ids=first.video_ids[:1],
            clip_feats=first.clip_feats[:1],
            frame_feats=first.frame_feats[:1],
            frame_mask=first.frame_mask[:1],
        )
        torch.testing.assert_close(model.encode_videos(alone)[0], together[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("count", [10, 60])
def test_prototype_count_is_the_parameter(batch: TrainBatch, count: int) -> None:
    model = build_model("prototypes", cfg=dataclasses.replace(TINY, num_prototypes=count))
    assert model.branches["clip"].generator.prototypes.shape == (count, TINY.hidden_size)
    with torch.no_grad():
        assert model.eval().encode_videos(batch.videos).shape[1] == 2 * count


def test_default_storage_is_the_papers_0_09_mb() -> None:
    model = Prototypes().eval()  # Table 8 defaults: 30 prototypes per branch, D = 384
    videos = VideoBatch(["v"], torch.randn(1, 32, 512), torch.randn(1, 50, 512), torch.ones(1, 50))
    with torch.no_grad():
        stored = model.encode_videos(videos)
    assert stored.shape == (1, 60, 384)
    assert bytes_per_video(stored.shape[1:], stored.dtype) / 1e6 == pytest.approx(0.09, abs=0.005)


def test_prototype_iterations_reuse_the_generator(batch: TrainBatch) -> None:
    torch.manual_seed(0)
    once = Prototypes(TINY).eval()
    twice = Prototypes(dataclasses.replace(TINY, prototype_iterations=2)).eval()
    twice.load_state_dict(once.state_dict())  # K adds no parameters
    with torch.no_grad():
        assert not torch.allclose(once.encode_videos(batch.videos), twice.encode_videos(batch.videos))


def test_all_terms_sum_to_total_and_every_parameter_learns(batch: TrainBatch) -> None:
    torch.manual_seed(0)
    model = Prototypes(TINY)
    losses = losses_of(model, batch)
    main = {k: v for k, v in losses.items() if k != "total" and "_trip_" not in k}
    expected = RETRIEVAL_TERMS | {f"{b}_{t}" for b in ("clip", "frame") for t in SWITCHES.values()}
    assert set(main) == expected
    torch.testing.assert_close(losses["total"], sum(main.values()))
    losses["total"].backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_each_switch_removes_its_term_and_parameters(batch: TrainBatch, switch: str) -> None:
    torch.manual_seed(0)
    full = Prototypes(TINY)
    torch.manual_seed(0)
    ablated = Prototypes(dataclasses.replace(TINY, **{switch: False}))
    losses = losses_of(ablated, batch)
    assert not any(key.endswith(f"_{SWITCHES[switch]}") for key in losses)
    full_names = {n for n, _ in full.named_parameters()}
    ablated_names = {n for n, _ in ablated.named_parameters()}
    removed = full_names - ablated_names
    assert ablated_names <= full_names
    if switch == "cross_recon":
        assert removed and all(".text_decoder." in n for n in removed)
    elif switch == "uni_recon":
        assert removed and all(".row_decoder." in n for n in removed)
    else:
        assert not removed  # guidance and ortho are losses on the generator, without parameters of their own
    losses["total"].backward()
    assert all(p.grad is not None for p in ablated.parameters())


def test_baseline_row_of_table_4_is_the_retrieval_loss_only(batch: TrainBatch) -> None:
    cfg = dataclasses.replace(TINY, cross_recon=False, uni_recon=False, guidance=False, ortho=False)
    losses = losses_of(Prototypes(cfg), batch)
    assert {k for k in losses if k != "total" and "_trip_" not in k} == RETRIEVAL_TERMS


def test_guidance_changes_with_its_margin_and_is_zero_for_one_video(batch: TrainBatch) -> None:
    torch.manual_seed(0)
    model = Prototypes(TINY)
    torch.manual_seed(0)
    wider = Prototypes(dataclasses.replace(TINY, guidance_margin=0.5))
    assert not torch.isclose(losses_of(model, batch)["clip_attn"], losses_of(wider, batch)["clip_attn"])
    one = tiny_batch(num_videos=1)
    assert losses_of(model, one)["frame_attn"].item() == 0.0


def test_exhaustive_clips_switch_changes_the_attended_rows(batch: TrainBatch) -> None:
    for exhaustive, rows in ((True, TINY.map_size * (TINY.map_size + 1) // 2), (False, TINY.map_size)):
        model = Prototypes(dataclasses.replace(TINY, exhaustive_clips=exhaustive))
        _, attention = model.branches["clip"](batch.videos.clip_feats, None)
        assert attention.shape[-1] == rows
        torch.testing.assert_close(attention.sum(dim=-1), torch.ones(attention.shape[:2]))


def test_orthogonal_loss() -> None:
    orthonormal = torch.linalg.qr(torch.randn(2, 16, 8))[0].transpose(1, 2)  # [2, 8, 16] orthonormal rows
    assert orthogonal_loss(orthonormal).item() == pytest.approx(0.0, abs=1e-6)
    assert orthogonal_loss(3 * orthonormal, "l1").item() == pytest.approx(0.0, abs=1e-6)
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # negative cosine is not penalised
    assert orthogonal_loss(opposite).item() == 0.0
    same = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])  # off-diagonal overlaps 1 and 1 over L_p (L_p - 1) = 2
    assert orthogonal_loss(same, "fro").item() == pytest.approx(math.sqrt(2) / 2)
    assert orthogonal_loss(same, "l1").item() == pytest.approx(1.0)


def test_shared_mask_hits_only_word_positions() -> None:
    lengths = torch.tensor([3, 7, 10, 5, 2])
    token_mask = (torch.arange(10)[None] < lengths[:, None]).float()
    words = word_positions(token_mask)
    assert words.sum(dim=1).tolist() == [1, 5, 8, 3, 0]
    for seed in range(20):
        masked = sample_shared_mask(token_mask, 0.3, torch.Generator().manual_seed(seed))
        assert not (masked & ~words).any()  # never SOT, EOT or padding
        shared = masked.any(dim=0)
        assert 1 <= shared.sum() == round(0.3 * 8)  # 8 positions are a word in some query
        assert torch.equal(masked, words & shared[None])  # the same positions M for every query


def test_masked_tokens_are_hidden_from_the_text_decoder(batch: TrainBatch) -> None:
    decoder = Prototypes(TINY).branches["clip"].text_decoder.eval()
    queries = batch.queries
    masked = sample_shared_mask(queries.query_mask, 0.5, torch.Generator().manual_seed(0))
    prototype = torch.randn(len(masked), TINY.hidden_size)
    changed = torch.where(masked[..., None], torch.randn_like(queries.query_feats), queries.query_feats)
    with torch.no_grad():
        before = decoder(queries.query_feats, queries.query_mask, masked, prototype)
        after = decoder(changed, queries.query_mask, masked, prototype)
        unmasked_changed = decoder(changed, queries.query_mask, torch.zeros_like(masked), prototype)
    torch.testing.assert_close(before, after)
    assert not torch.allclose(before, unmasked_changed)


def test_masked_token_nce_prefers_the_right_token() -> None:
    targets = torch.randn(12, 8)
    right = masked_token_nce(targets + 0.01 * torch.randn_like(targets), targets, temperature=0.1)
    wrong = masked_token_nce(targets.roll(1, dims=0), targets, temperature=0.1)
    assert right < 0.1 < 1.0 < wrong
    assert masked_token_nce(targets, targets).item() == pytest.approx(
        -torch.log_softmax(F.normalize(targets) @ F.normalize(targets).T, dim=1).diagonal().mean().item(), rel=1e-5
    )


def test_attention_guidance_loss_values() -> None:
    mass = torch.tensor([1.0, 0.0, 0.0, 1.0])
    label = torch.tensor([True, False, True, False])
    losses = [attention_guidance_loss(mass[i : i + 1], label[i : i + 1], 0.2).item() for i in range(4)]
    assert losses == pytest.approx([-math.log(1.2), -math.log(1.2), -math.log(0.2), -math.log(0.2)])


def test_video_mixing_packs_half_rate_rows() -> None:
    rows = torch.arange(3 * 6, dtype=torch.float32).reshape(3, 6, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    mixed, mixed_mask, first = mix_video_pairs(rows, mask)
    # video 0 keeps rows 0, 2, 4; video 1 keeps rows 6, 8 (its row 10 is padding); packed to the front
    assert mixed[0, :5, 0].tolist() == [0, 2, 4, 6, 8]
    assert mixed_mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert first[0, :5].tolist() == [1, 1, 1, 0, 0]
    assert mixed[2, :6, 0].tolist() == [12, 14, 16, 0, 2, 4]  # cyclic: the last video is followed by the first
    clips, no_mask, first_clip = mix_video_pairs(rows, None)
    assert no_mask is None and clips.shape == (3, 6, 1) and first_clip[0].tolist() == [1, 1, 1, 0, 0, 0]
    odd, _, first_odd = mix_video_pairs(rows[:, :5], mask[:, :5])  # as many rows as the input
    assert odd[1, :, 0].tolist() == [6, 8, 12, 14, 10] and first_odd[1].tolist() == [1, 1, 0, 0, 1]
    share = Prototypes(TINY).branches["clip"].first_video_share(first_clip)
    assert share[0, :6].tolist() == [1, 1, 1, 0, 0, 0]  # single clips
    assert share[0, -1].item() == pytest.approx(0.5)  # the whole mixture


def test_broadcast_decoder_mixes_per_prototype_decodings() -> None:
    decoder = BroadcastDecoder(hidden=8, out_dim=5, max_positions=7)
    prototypes = torch.randn(2, 3, 8)
    hidden = F.relu(decoder.prototype_in(prototypes)[:, :, None] + decoder.positions.weight[:7])
    per_prototype = decoder.out(hidden)  # [B, L_p, L, out]
    weights = decoder.mixing(hidden).softmax(dim=1)
    torch.testing.assert_close(decoder(prototypes, 7), (weights * per_prototype).sum(dim=1))


def test_config_from_params_and_validation() -> None:
    cfg = config_from_dict(PrototypesConfig, {"num_prototypes": 60, "ortho_norm": "l1", "guidance": False}, "params")
    assert (cfg.num_prototypes, cfg.ortho_norm, cfg.guidance, cfg.nce_weight) == (60, "l1", False, 0.03)
    with pytest.raises(PipelineError):
        config_from_dict(PrototypesConfig, {"ortho_norm": "l2"}, "params")
    with pytest.raises(PipelineError):
        config_from_dict(PrototypesConfig, {"num_prototypes": 0}, "params")


def test_a_few_steps_reduce_the_loss(batch: TrainBatch) -> None:
    torch.manual_seed(0)
    model = Prototypes(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    start = losses_of(model, batch)
    for step in range(15):
        optimizer.zero_grad()
        losses_of(model, batch, seed=step + 1)["total"].backward()
        optimizer.step()
    end = losses_of(model, batch)
    assert end["total"] < 0.8 * start["total"]
    for term in ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "clip_urecon", "frame_urecon"):
        assert end[term] < start[term], term


def test_the_shared_baseline_trainer_trains_it() -> None:
    train_videos, train_texts, train_queries = tiny_features(6, seed=2)
    val_videos, val_texts, val_queries = tiny_features(4, seed=3, split="val")
    datasets = BaselineDatasets.from_annotations(
        train_queries + val_queries, train_videos | val_videos, train_texts | val_texts, TINY.preprocess()
    )
    cfg = BaselineTrainConfig(n_epoch=2, batch_size=3, hard_negative_start_epoch=1, device="cpu", seed=0)
    model = build_model("prototypes", cfg=TINY)
    result = train_baseline(model, datasets, cfg, progress=False)
    assert len(result.history) == 2 and 0 <= result.best_epoch <= 1
    assert {"total", "clip_crecon", "frame_urecon", "clip_attn", "frame_ortho", "SumR"} <= set(result.history[-1])
    model.load_state_dict(result.state_dict)


# ---- Table 6: prototype construction --------------------------------------------------------------------------
GENERATORS = ("cross_attention", "perceiver", "slot_attention")


def generator_of(design: str, iterations: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY, prototype_generator=design, prototype_iterations=iterations)
    return Prototypes(cfg).branches["frame"].generator.eval()


@pytest.mark.parametrize("design", GENERATORS)
def test_each_generator_gives_prototypes_and_row_attention(batch: TrainBatch, design: str) -> None:
    generator = generator_of(design, iterations=2)
    rows = torch.randn(*batch.videos.frame_feats.shape[:2], TINY.hidden_size)
    mask = batch.videos.frame_mask
    with torch.no_grad():
        prototypes, attention = generator(rows, mask)
    assert prototypes.shape == (len(rows), TINY.num_prototypes, TINY.hidden_size)
    assert attention.shape == (len(rows), TINY.num_prototypes, rows.shape[1])
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(attention.shape[:2]))  # over the valid rows
    assert (attention * (1 - mask[:, None])).abs().max() < 1e-6  # nothing on padded rows


@pytest.mark.parametrize("design", GENERATORS)
def test_each_generator_trains(batch: TrainBatch, design: str) -> None:
    torch.manual_seed(0)
    model = Prototypes(dataclasses.replace(TINY, prototype_generator=design))
    with torch.no_grad():
        assert model.eval().encode_videos(batch.videos).shape == (6, 2 * TINY.num_prototypes, TINY.hidden_size)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    start = losses_of(model, batch)["total"]
    start.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent
    for step in range(10):
        optimizer.step()
        optimizer.zero_grad()
        losses_of(model, batch, seed=step + 1)["total"].backward()
    assert losses_of(model, batch)["total"] < start


def test_only_slot_attention_makes_prototypes_compete_for_rows() -> None:
    rows = torch.randn(3, 7, TINY.hidden_size)
    for design in GENERATORS:
        generator = generator_of(design)
        changed = generator_of(design)
        with torch.no_grad():
            changed.prototypes[1] = torch.randn(TINY.hidden_size)  # another initial prototype
            (first, attention), (first_changed, attention_changed) = generator(rows, None), changed(rows, None)
        own_attention_moved = not torch.allclose(attention[:, 0], attention_changed[:, 0], atol=1e-6)
        assert own_attention_moved == (design == "slot_attention"), design  # softmax over slots vs over rows
        own_prototype_moved = not torch.allclose(first[:, 0], first_changed[:, 0], atol=1e-6)
        assert own_prototype_moved == (design != "cross_attention"), design  # (a) latent self-attention, (b) shares
    slots = generator_of("slot_attention")
    with torch.no_grad():
        share = slots.competition(slots.prototypes.expand(3, -1, -1), slots.key(slots.row_norm(rows)))
    torch.testing.assert_close(share.sum(dim=-1), torch.ones(3, 7))  # every row is split among the slots


def test_slot_attention_updates_slots_with_a_gru_each_round() -> None:
    rows = torch.randn(2, 6, TINY.hidden_size)
    once, twice = generator_of("slot_attention", 1), generator_of("slot_attention", 2)
    twice.load_state_dict(once.state_dict())  # rounds share every weight
    with torch.no_grad():
        expected = once.prototypes.expand(2, -1, -1)
        values = once.value(once.row_norm(rows))
        for round_index in range(2):  # weighted mean of the values -> GRU(update, previous slot) -> residual MLP
            share = once.competition(expected, once.key(once.row_norm(rows))) + 1e-8
            weights = (share / share.sum(dim=1, keepdim=True)).transpose(1, 2)
            state = once.gru((weights @ values).flatten(0, 1), expected.flatten(0, 1)).view(2, -1, TINY.hidden_size)
            expected = state + once.mlp(state)
            if round_index == 0:
                torch.testing.assert_close(once(rows, None)[0], expected)
        torch.testing.assert_close(twice(rows, None)[0], expected)


def test_prototype_generator_is_a_params_switch() -> None:
    cfg = config_from_dict(PrototypesConfig, {"prototype_generator": "slot_attention"}, "params")
    assert cfg.prototype_generator == "slot_attention" and PrototypesConfig().prototype_generator == "cross_attention"
    with pytest.raises(PipelineError):
        config_from_dict(PrototypesConfig, {"prototype_generator": "gru"}, "params")
    keys = [k for k in Prototypes(TINY).state_dict() if k.startswith("branches.clip.generator.")]
    assert keys[:2] == ["branches.clip.generator.prototypes", "branches.clip.generator.attention.query.weight"]
