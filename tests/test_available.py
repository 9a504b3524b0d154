"""The available set: videos that fail to decode (or are missing) are left out of every later stage, the same for
every model, with the counts in every metrics file; the numbers equal those of a dataset of the good videos alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stages.data.available import available_queries, failures_path
from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.data.feature_store import FeatureStore
from stages.data.prepare import PrepareConfig, run_prepare
from stages.evaluate.evaluator import EvalConfig, EvaluateConfig
from stages.extract.decode import DecodeConfig, run_decode
from stages.extract.features import FeaturesConfig, run_features
from stages.models.propy import ProPyConfig
from stages.models.pyramid import PyramidConfig
from stages.train.baseline_training import BaselineTrainConfig
from stages.train.train_baseline import BaselineStageConfig, run_evaluate_baseline, run_train_baseline
from stages.train.train_propy import TrainPropyConfig, run_evaluate_propy, run_train_propy
from tests.videos import make_video

GOOD = {"train": ["g0", "g1", "g2", "g3", "g4"], "val": ["g5", "g6", "g7"], "test": ["g8", "g9", "g10", "g11"]}
BAD = {"train": ["missing"], "val": ["cut"], "test": ["empty", "noise"]}
PROPY = TrainPropyConfig(
    model=ProPyConfig(
        pyramid=PyramidConfig(num_frames=4, offset=(1, 1)), num_visual_prompts=2, adapter_channels=8, adapter_kernel=3
    ),
    epochs=1,
    batch_videos=2,
    lr=1e-3,
    max_words=12,
    device="cpu",
)
MSL = BaselineStageConfig(
    model={"hidden_size": 16, "n_heads": 2, "max_ctx_l": 8, "max_desc_l": 8, "map_size": 4},
    train=BaselineTrainConfig(n_epoch=1, batch_size=4, hard_negative_start_epoch=0, eval_video_batch=4),
)
EVALUATION = EvaluateConfig(
    EvalConfig(measure_efficiency=False), also_splits=("val",), untrained_reference=False, batch_videos=4
)
COUNTS = ("queries_total", "queries_evaluated", "videos_unavailable")


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good mp4s, plus a zero-byte file, random bytes and a truncated mp4 (and no file for `missing`)."""
    folder = tmp_path_factory.mktemp("videos")
    for seed, vid in enumerate(v for split in GOOD.values() for v in split):
        make_video(folder / f"{vid}.mp4", 2.0 + 0.4 * (seed % 3), seed=seed)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    whole = make_video(folder / "source.mp4", 3.0, seed=99).read_bytes()
    (folder / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    return folder


def _tvr_files(root: Path, with_bad: bool) -> dict[str, str]:
    """TVR-format annotations, two captions per video (the bad videos' lines only `with_bad`)."""
    files = {}
    for split, good in GOOD.items():
        lines = []
        for vid in good + (BAD[split] if with_bad else []):
            for k in range(2):
                ts = [0.3 * k, 0.3 * k + 1.0]
                lines.append(
                    {"desc_id": f"{vid}#{k}", "desc": f"shape {k} of {vid}", "vid_name": vid, "duration": 2.0, "ts": ts}
                )
        files[split] = str(root / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return files


def _run(root: Path, videos: Path, clip: Path, scheduler: str, with_bad: bool) -> tuple[BaseConfig, dict]:
    """prepare -> decode -> features -> train ProPy and MS-SL -> evaluate ProPy, MS-SL and frozen CLIP MIL."""
    base = BaseConfig(
        dataset="toy",
        seed=3,
        cache_dir=str(root / "cache"),
        metrics_dir=str(root / "metrics"),
        clip_weights=str(clip),
        clip_arch="vit-w128-l2-p32-r64",
    )
    root.mkdir(parents=True)
    run_prepare(base, PrepareConfig(format="tvr", files=_tvr_files(root, with_bad)))
    decode = DecodeConfig(video_dir=str(videos), size=64, workers=1, scheduler_address=scheduler, max_failures=4)
    if with_bad:
        with pytest.raises(PipelineError, match=r"4 video\(s\) could not be decoded \(max_failures=3\)"):
            run_decode(base, DecodeConfig(**{**decode.__dict__, "max_failures": 3}))
    assert len(run_decode(base, decode).failures) == (4 if with_bad else 0)
    run_features(base, FeaturesConfig(workers=0))
    run_train_propy(base, PROPY)
    run_train_baseline(base, "msl", MSL)
    metrics = {
        "propy": run_evaluate_propy(base, PROPY, EVALUATION),
        "msl": run_evaluate_baseline(base, "msl", MSL, EVALUATION),
        "clip_mil": run_evaluate_baseline(base, "clip_mil", BaselineStageConfig(), EVALUATION),
    }
    return base, metrics


def _without_counts(metrics: dict) -> dict:
    return {
        key: _without_counts(value) if isinstance(value, dict) else value
        for key, value in metrics.items()
        if key not in COUNTS
    }


def test_bad_and_missing_videos_are_left_out_of_every_stage_alike(
    tmp_path: Path, videos: Path, tiny_clip_weights: Path, scheduler: str, capfd: pytest.CaptureFixture
) -> None:
    base, with_bad = _run(tmp_path / "with_bad", videos, tiny_clip_weights, scheduler, with_bad=True)
    logged = capfd.readouterr().err
    manifest = failures_path(base)
    reasons = {r["video_id"]: r["reason"] for r in map(json.loads, manifest.read_text().splitlines())}
    assert sorted(reasons) == ["cut", "empty", "missing", "noise"]
    assert "file not found" in reasons["missing"] and "empty file" in reasons["empty"]
    assert "all splits: left out 8 of 32 queries whose 4 video(s) decode could not store" in logged
    assert "split 'test': left out 4 of 12 queries whose 2 video(s)" in logged and str(manifest) in logged
    for stage in ("features", "train_propy", "train_baseline msl", "evaluate propy", "evaluate msl"):
        assert f"{stage}: " in logged, stage

    store = FeatureStore(base.features_path())
    good = sorted(v for split in GOOD.values() for v in split)
    assert sorted(store.videos) == good and len(store.texts) == 2 * len(good)  # features of the available set only
    for metrics in with_bad.values():
        assert {k: metrics[k] for k in COUNTS} == {"queries_total": 12, "queries_evaluated": 8, "videos_unavailable": 2}
        assert {k: metrics["splits"]["val"][k] for k in COUNTS} == {
            "queries_total": 8,
            "queries_evaluated": 6,
            "videos_unavailable": 1,
        }
        assert metrics["num_queries"] == 8 and metrics["num_videos"] == 4
    written = json.loads((base.dataset_metrics / "msl.json").read_text())
    assert written["videos_unavailable"] == 2 and written["queries_total"] == 12

    _, good_only = _run(tmp_path / "good_only", videos, tiny_clip_weights, scheduler, with_bad=False)
    for model, metrics in good_only.items():
        assert metrics["videos_unavailable"] == 0 and metrics["queries_total"] == metrics["queries_evaluated"] == 8
        assert _without_counts(with_bad[model]) == _without_counts(metrics), model


def test_a_split_that_does_not_exist_names_the_splits_and_the_key(tmp_path: Path) -> None:
    base = BaseConfig(dataset="toy", cache_dir=str(tmp_path / "cache"))
    files = _tvr_files(tmp_path, with_bad=False)
    run_prepare(base, PrepareConfig(format="tvr", files={"train": files["train"], "val": files["val"]}))
    with pytest.raises(PipelineError, match=r"no queries of split 'test' \(its splits: train, val\); set evaluate"):
        available_queries(base, "test", key="evaluate.protocol.split")
    assert len(available_queries(base, "val").queries) == 6  # no manifest: every annotated video counts
