"""MSC-PRVR: equivalence with the official code (fixtures), official state dicts, its preprocessing and its losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.config import config_from_dict
from stages.data.errors import PipelineError
from stages.data.schema import Query
from stages.evaluate.evaluator import EvalConfig, evaluate_encoder
from stages.models.baselines.data import (
    QueryDataset,
    VideoDataset,
    VideoQueryDataset,
    collate_queries,
    collate_train,
    collate_videos,
)
from stages.models.baselines.importer import official_state_dict
from stages.models.baselines.losses import NegativeSampling
from stages.models.baselines.msc import MSC, MSCConfig, merge_adjacent_pairs
from stages.models.baselines.msc_losses import (
    Segments,
    bipartite_merge,
    intra_video_ratio,
    rkd_angle,
    rkd_distance,
)
from stages.models.baselines.msc_reference import msc_config
from stages.models.baselines.reference import fixture_batches, load_fixture
from stages.models.imported import verify_checkpoint
from stages.models.reference import TOLERANCE, run_reference_check
from stages.models.trained import save_baseline

SHARED = MSCConfig(visual_input_size=32, query_input_size=24, hidden_size=48, max_ctx_l=128, max_desc_l=32, map_size=32)
SMALL = MSCConfig(
    visual_input_size=12,
    query_input_size=10,
    hidden_size=16,
    n_heads=2,
    max_ctx_l=16,
    max_desc_l=6,
    map_size=8,
    merge_targets=(10, 8),
    adaptive_ranks=((0.8, 3), (0.5, 5)),
)


@pytest.fixture(scope="module")
def prefix(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "baselines_official" / "msc_shared")


def _toy_sources(seed: int, lengths: list[int]) -> tuple[dict, dict, list[Query]]:
    """Videos of a few constant events and, per video, two queries whose last token is one of its frames."""
    rng = np.random.default_rng(seed)
    videos, texts, queries = {}, {}, []
    for v, length in enumerate(lengths):
        events = rng.normal(size=(3, SMALL.visual_input_size))
        frames = events[np.sort(rng.integers(0, 3, size=length))] + 0.1 * rng.normal(size=(length, 12))
        videos[f"v{v}"] = frames.astype(np.float32)
        for k in range(2):
            tokens = rng.normal(size=(int(rng.integers(3, 6)), SMALL.query_input_size))
            tokens[-1, :] = frames[int(rng.integers(length)), : SMALL.query_input_size]
            texts[f"v{v}#{k}"] = tokens.astype(np.float32)
            queries.append(Query(f"v{v}#{k}", "text", f"v{v}", 10.0, (), "train"))
    return videos, texts, queries


def test_reference_check_matches_official_code(prefix: str) -> None:
    errors = run_reference_check("msc", prefix)
    assert set(errors) >= {
        "preprocess_inputs",
        "preprocess_merging",
        "query_encoder",
        "clip_encoder",
        "frame_encoder",
        "dygmm_mixing",
        "teacher",
        "inference_scores",
        "train_scores",
        "video_projection",
        "vl_internals",
        "rkd",
        "loss_hardest",
        "loss_random",
        "loss_hardpool",
        "negatives",
    }
    assert max(errors.values()) <= TOLERANCE
    assert errors["preprocess_bins"] == errors["batch_orders"] == errors["negatives"] == errors["teacher"] == 0
    assert errors["preprocess_inputs"] < 1e-6 and errors["inference_scores"] < 1e-6
    assert max(errors[f"loss_{mode}"] for mode in ("hardest", "random", "hardpool")) < 1e-6


def test_official_state_dict_loads_and_gives_the_official_scores(prefix: str) -> None:
    state = torch.load(f"{prefix}_official_state_dict.pt", weights_only=True)
    model = MSC(SHARED)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in state.items()
    ]
    container = {"config": {}, "epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    model.load_state_dict(official_state_dict(container), strict=True)
    model.eval()
    _, io, _ = load_fixture(prefix)
    videos, queries = fixture_batches(io, 5, 9)
    with torch.no_grad():
        scores = model.score(model.encode_queries(queries), model.encode_videos(videos))
    np.testing.assert_allclose(scores.numpy(), io["infer_fused_scores"], atol=1e-6, rtol=0)
    assert sum(v.numel() for v in state.values()) == 498_192


def test_preprocessing_averages_frames_and_merges_clips_in_order() -> None:
    videos, _, _ = _toy_sources(0, [5, 16, 37])
    items = list(VideoDataset(list(videos), videos, SMALL.preprocess()))
    batch = collate_videos(items)
    assert batch.frame_feats.shape == (3, SMALL.max_ctx_l, 12) and (batch.frame_mask == 1).all()
    assert batch.clip_feats.shape == (3, SMALL.map_size, 12)
    assert (batch.clip_sizes.sum(dim=1) == SMALL.max_ctx_l).all()
    for sizes, labels in zip(batch.clip_sizes, batch.frame_labels, strict=True):
        assert (labels.diff() >= 0).all() and labels[0] == 0 and labels[-1] == SMALL.map_size - 1
        assert torch.equal(torch.bincount(labels, minlength=SMALL.map_size).float(), sizes)
    np.testing.assert_allclose(np.linalg.norm(batch.clip_feats.numpy(), axis=-1), 1.0, atol=1e-4)


def test_merge_stage_takes_the_most_similar_adjacent_pairs() -> None:
    tokens = np.array([[1, 0], [1, 0], [0, 1], [2, 0], [0, 3], [0, 3]], dtype=np.float32)
    stage = merge_adjacent_pairs(tokens, np.array([1, 3, 1, 1, 1, 1], np.float32), np.arange(6), target=4)
    np.testing.assert_array_equal(stage.pair_similarity, [1, 0, 9])
    np.testing.assert_array_equal(stage.merged, [True, False, True])
    np.testing.assert_allclose(stage.tokens, [[1, 0], [0, 1], [2, 0], [0, 3]])  # size-weighted averages
    np.testing.assert_array_equal(stage.sizes, [4, 1, 1, 2])
    np.testing.assert_array_equal(stage.labels, [0, 0, 1, 2, 3, 3])


def test_loss_side_merge_is_a_bipartite_matching() -> None:
    """Even positions match odd ones anywhere in the sequence: the merge does not keep the order."""
    metric = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1]])  # 0 ~ 3 and 2 ~ 1
    values = torch.arange(8.0).view(4, 2)
    merged = bipartite_merge(Segments(values, metric, torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.arange(4)), target=2)
    torch.testing.assert_close(
        merged.values, torch.stack([(values[0] + 3 * values[3]) / 4, (values[1] + 2 * values[2]) / 3])
    )
    assert merged.sizes.tolist() == [4.0, 3.0] and merged.frame_labels.tolist() == [0, 1, 1, 0]


def test_intra_ratio_uses_connected_components() -> None:
    """a ~ b and b ~ c but not a ~ c: (a, c) still count; d is alone: 6 of the 12 ordered pairs."""
    angles = torch.tensor([0.0, 0.6, 1.2, 3.0])
    clips = torch.stack([angles.cos(), angles.sin()], dim=1)[None]
    assert intra_video_ratio(clips, threshold=0.8).item() == pytest.approx(0.5)


def test_rkd_is_invariant_to_the_teacher_scale() -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert rkd_distance(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle(x, 2 * x + 1).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle(x, x.flip(0)).item() > 1e-3


def test_merge_sizes_are_needed_and_enter_only_the_clip_block() -> None:
    torch.manual_seed(0)
    model = MSC(SMALL).eval()
    videos, _, _ = _toy_sources(1, [9, 30])
    batch = collate_videos(list(VideoDataset(list(videos), videos, SMALL.preprocess())))
    with torch.no_grad():
        packed = model.encode_videos(batch)
        uniform = model.encode_videos(dataclasses.replace(batch, clip_sizes=torch.ones_like(batch.clip_sizes)))
        with pytest.raises(PipelineError, match="merge sizes"):
            model.encode_videos(dataclasses.replace(batch, clip_sizes=None))
    clips = slice(0, SMALL.map_size)
    assert (packed[:, clips] - uniform[:, clips]).abs().max() > 1e-3
    torch.testing.assert_close(packed[:, SMALL.map_size :], uniform[:, SMALL.map_size :], atol=0, rtol=0)


def test_config_is_validated() -> None:
    with pytest.raises(PipelineError, match="must be map_size"):
        config_from_dict(MSCConfig, {"map_size": 16}, "baselines.msc.model")
    with pytest.raises(PipelineError, match="cannot be merged"):
        config_from_dict(MSCConfig, {"merge_targets": [60, 52, 32]}, "baselines.msc.model")
    with pytest.raises(PipelineError, match="in one step"):
        config_from_dict(MSCConfig, {"adaptive_ranks": [[0.5, 5]]}, "baselines.msc.model")
    cfg = config_from_dict(MSCConfig, dataclasses.asdict(SMALL), "training.json")  # the saved record round-trips
    assert cfg == SMALL


def test_training_on_the_real_collates_and_the_loss_falls() -> None:
    torch.manual_seed(0)
    videos, texts, queries = _toy_sources(2, [9, 16, 23, 40])
    dataset = VideoQueryDataset(queries, videos, texts, SMALL.preprocess())
    batch = collate_train([dataset[i] for i in range(len(dataset))])
    model = MSC(SMALL).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, parts = model.training_loss(batch, NegativeSampling(hard=True, pool_size=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(parts) >= {"clip_nce", "clip_trip", "frame_nce", "frame_trip", "vidlvlctl", "txt_rkd", "total"}
    terms = ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "vidlvlctl", "txt_rkd")
    assert loss.item() == pytest.approx(sum(parts[k].item() for k in terms))
    assert all(p.grad is not None for p in model.parameters())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    video_ids = list(videos)
    metrics = evaluate_encoder(
        model,
        [collate_videos(list(VideoDataset(video_ids, videos, SMALL.preprocess())))],
        [collate_queries(list(QueryDataset([q.query_id for q in queries], texts, SMALL.preprocess())))],
        torch.tensor([video_ids.index(q.video_id) for q in queries]),
        EvalConfig(split="train", moment_retrieval=False, measure_efficiency=False),
    )
    assert 0 <= metrics["SumR"] <= 400 and metrics["num_videos"] == 4


def test_moment_units_are_the_merged_clips_covering_each_video_in_order() -> None:
    """Search places MSC's clips on the raw frames merged into them: consecutive spans that tile each video."""
    lengths = [5, 16, 40]  # fewer raw frames than rows (repeated), exactly max_ctx_l, more (averaged)
    videos, _, _ = _toy_sources(3, lengths)
    batch = collate_videos(list(VideoDataset(list(videos), videos, SMALL.preprocess())))
    units = MSC(SMALL).eval().moment_units(batch, lengths)
    assert units.rows.tolist() == list(range(SMALL.map_size))
    windows = units.windows.numpy()
    assert windows.shape == (3, SMALL.map_size, 2) and not np.isnan(windows).any()
    np.testing.assert_allclose(windows[:, 0, 0], 0.0)
    np.testing.assert_allclose(windows[:, -1, 1], [1.0, 1.0, 39 / 40])  # official averaging drops the last frame
    assert (windows[..., 1] > windows[..., 0]).all()
    assert (windows[:, 1:, 0] >= windows[:, :-1, 0]).all() and (windows[:, 1:, 1] >= windows[:, :-1, 1]).all()
    labels = batch.frame_labels.numpy()
    sizes = np.stack([np.bincount(row, minlength=SMALL.map_size) for row in labels])
    torch.testing.assert_close(batch.clip_sizes, torch.from_numpy(sizes).to(batch.clip_sizes.dtype))


def test_our_msc_file_is_checked_against_the_fixture_it_reproduces(prefix: str, tmp_path: Path) -> None:
    """`verify-reference msc --checkpoint`: the fixture's model saved by us passes (the fixture's `map_size` is its
    averaging length; the check's own config builder says how it maps to ours); another config is refused."""
    config, _, state = load_fixture(prefix)
    model = MSC(msc_config(config))
    model.load_state_dict(state, strict=True)
    record = {"model": "msc", "model_config": dataclasses.asdict(model.cfg)}
    errors = verify_checkpoint("msc", prefix, save_baseline(tmp_path / "ours", model.state_dict(), record))
    assert max(errors.values()) <= TOLERANCE
    other = dataclasses.replace(model.cfg, sim_thr=model.cfg.sim_thr + 0.1)
    record = {"model": "msc", "model_config": dataclasses.asdict(other)}
    with pytest.raises(PipelineError, match="sim_thr"):
        verify_checkpoint("msc", prefix, save_baseline(tmp_path / "other", model.state_dict(), record))
