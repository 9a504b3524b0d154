"""`index` and `search` on real mp4s with every kind of model: evaluation's ranking and windows, incremental and
resumable indexing, refused indexes, bad files, and the command line's JSON output."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import stages.search.index as index_module
from pipeline import cli
from stages.data.checkpoint import save_checkpoint
from stages.data.errors import PipelineError
from stages.data.frame_cache import FrameCache
from stages.data.frame_dataset import FrameDataset
from stages.evaluate.retrieval import ScoringConfig, similarity_matrix
from stages.extract.decode import DecodeConfig
from stages.extract.features import encode_videos, query_features
from stages.models import available_models, build_model
from stages.models.baselines.data import QueryDataset, VideoDataset, collate_queries, collate_videos
from stages.models.clip_backbone import file_sha256, load_clip
from stages.models.propy import ProPyConfig
from stages.models.propy_import import load_propy
from stages.models.pyramid import PyramidConfig
from stages.models.trained import PropyEncoder, baseline_config, load_baseline, save_baseline
from stages.search.index import SearchConfig, run_index, scan_folder, video_key
from stages.search.models import ModelChoice
from stages.search.search import Searcher
from tests.tiny_baselines import tiny_keys
from tests.videos import make_video

REPO = Path(__file__).resolve().parents[1]
FRAMES = DecodeConfig(size=64, workers=1, timeout_s=60)
CONFIG = SearchConfig(device="cpu", batch_videos=3)
TOY_PROPY = ProPyConfig(
    pyramid=PyramidConfig(num_frames=4, offset=(1, 1)), num_visual_prompts=2, adapter_channels=8, adapter_kernel=3
)
QUERIES = ["a bright bar slides to the right", "a grey background", "something moves", "a flash of noise"]
MAX_WORDS = 12


def make_videos(folder: Path, lengths: tuple[float, ...] = (2, 3, 4, 5, 6)) -> list[Path]:
    """Real H.264 mp4s of the given lengths (10 fps, 96x64), one in a sub-folder."""
    return [
        make_video(folder / ("part" if i == 1 else "") / f"clip{i}.mp4", seconds, seed=i)
        for i, seconds in enumerate(lengths)
    ]


def trained_choice(root: Path, name: str, clip_weights: Path) -> ModelChoice:
    """A randomly initialised model of `name`, saved where and how training saves it."""
    torch.manual_seed(0)
    if name == "propy":
        clip, arch = load_clip(clip_weights)
        model = build_model("propy", clip=clip, arch=arch, config=TOY_PROPY)
        path = root / "propy.pt"
        payload = {"model": "propy", "model_config": TOY_PROPY.to_dict(), "clip_sha256": file_sha256(clip_weights)}
        save_checkpoint(path, {**payload, "trainable": model.trainable_state_dict()})
        return ModelChoice("propy", str(path), str(clip_weights), max_words=MAX_WORDS, tail_fix=True)
    if name == "clip_mil":
        return ModelChoice(name, None, str(clip_weights))
    config = baseline_config(name, tiny_keys(name), load_clip(clip_weights)[1].embed_dim)
    record = {"model": name, "model_config": dataclasses.asdict(config), "select_split": "val", "best_epoch": 1}
    directory = save_baseline(root / name, build_model(name, cfg=config).state_dict(), record)
    return ModelChoice(name, str(directory), str(clip_weights))


def evaluation_scores(choice: ModelChoice, cache: FrameCache, keys: list[str]) -> tuple[np.ndarray, np.ndarray, list]:
    """What evaluation computes on the index's frames: scores [Q, V] (store order), the best unit of each pair as
    the model defines it [Q, V], and the units' windows (ProPy: its proposals)."""
    cpu = torch.device("cpu")
    with torch.inference_mode():
        if choice.name == "propy":
            model = load_propy(choice.checkpoint, choice.clip_weights)
            encoder = PropyEncoder(model, cpu, None, MAX_WORDS)
            frames = FrameDataset(cache, keys, TOY_PROPY.pyramid.num_frames, train=False, tail_fix=True)
            videos = torch.cat([encoder.encode_videos(batch) for batch in DataLoader(frames, batch_size=16)])
            scores, best = similarity_matrix(
                encoder.encode_queries(QUERIES), videos, ScoringConfig(device="cpu"), with_best_unit=True
            )
            return scores.numpy(), best.numpy(), model.proposals.tolist()
        clip, arch = load_clip(choice.clip_weights)
        features = dict(encode_videos(clip, cache, keys, 256, cpu))
        if choice.name == "clip_mil":
            model = build_model("clip_mil", max_frames=max(len(f) for f in features.values()))
        else:
            model, _, _ = load_baseline(choice.checkpoint, choice.name)
        preprocess = model.preprocess_config()
        loader = DataLoader(VideoDataset(keys, features, preprocess), batch_size=16, collate_fn=collate_videos)
        videos = torch.cat([model.encode_videos(batch) for batch in loader])
        names = [str(i) for i in range(len(QUERIES))]
        tokens = dict(zip(names, query_features(clip, QUERIES, cpu), strict=True))
        query_set = QueryDataset(names, tokens, preprocess)
        queries = model.encode_queries(collate_queries([query_set[i] for i in range(len(names))]))
        if choice.name == "clip_mil":
            scores, best = similarity_matrix(queries, videos, ScoringConfig(device="cpu"), with_best_unit=True)
            return scores.numpy(), best.numpy(), []
        scores, _ = similarity_matrix(queries, videos, ScoringConfig(device="cpu"), score_fn=model.score_fn)
        key_clip = model.score_branches(queries, videos).get("key_clip")
        return scores.numpy(), None if key_clip is None else key_clip.numpy(), []


def stable_order(row: np.ndarray) -> list[int]:
    return np.lexsort((np.arange(len(row)), -row)).tolist()


@pytest.mark.parametrize("name", available_models())
def test_search_ranks_as_evaluation_with_the_models_windows(tmp_path: Path, tiny_clip_weights: Path, name: str) -> None:
    make_videos(tmp_path / "videos")
    choice = trained_choice(tmp_path, name, tiny_clip_weights)
    summary = run_index(tmp_path / "videos", tmp_path / "index", choice, FRAMES, CONFIG)
    assert len(summary.added) == summary.videos == 5 and not summary.failures
    searcher = Searcher(tmp_path / "index", CONFIG)
    records = searcher.videos
    assert [r.video_id for r in records] == ["clip0", "clip2", "clip3", "clip4", "part/clip1"]
    scores, best, windows = evaluation_scores(
        choice, FrameCache(tmp_path / "index" / "frames.zarr"), [r.key for r in records]
    )
    hits = searcher.search(QUERIES, top_k=5)
    for row, best_row, query_hits in zip(scores, best if best is not None else scores, hits, strict=True):
        order = stable_order(row)
        assert np.diff(row[order]).min() < -2e-3, "near-tied videos: fp16 storage may reorder them"
        assert [h.video_id for h in query_hits] == [records[v].video_id for v in order]
        assert np.allclose([h.score for h in query_hits], row[order], atol=1e-3)
        for hit, video in zip(query_hits, order, strict=True):
            duration = records[video].duration
            assert 0 <= hit.start < hit.end <= duration + 1e-3 and Path(hit.thumbnail).is_file()
            assert Path(hit.path) == tmp_path / "videos" / records[video].path
            if name == "propy":  # the window of the event the MIL max picked, in seconds
                assert np.allclose([hit.start, hit.end], np.array(windows[best_row[video]]) * duration, atol=1e-3)
            elif best is not None:  # the key clip (prototypes: none); clip_mil: the best frame
                assert hit.unit == best_row[video]
    subset = searcher.search(QUERIES[:1], top_k=5, video_glob="part/*")[0]
    assert [h.video_id for h in subset] == ["part/clip1"]
    threshold = float(np.sort(scores[0])[-3:-1].mean())  # between the second and the third best
    assert [h.video_id for h in searcher.search(QUERIES[:1], 5, min_score=threshold)[0]] == [
        h.video_id for h in hits[0][:2]
    ]


def test_an_imported_official_checkpoint_indexes_and_searches_like_the_model(
    tmp_path: Path, tiny_clip_weights: Path
) -> None:
    """HLFormer (its manifolds share one curvature tensor): official state dict -> import-checkpoint -> index."""
    make_videos(tmp_path / "videos", (2, 3, 4))
    reference = trained_choice(tmp_path, "hlformer", tiny_clip_weights)
    official = tmp_path / "official.pth"
    torch.save({"model": load_file(str(Path(reference.checkpoint) / "model.safetensors"))}, official)
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"baselines": {"hlformer": {"model": tiny_keys("hlformer")}}}))
    imported = tmp_path / "imported"
    result = CliRunner().invoke(
        cli, ["--params", str(params), "import-checkpoint", str(official), str(imported), "--model", "hlformer"]
    )
    assert result.exit_code == 0, result.output
    choice = dataclasses.replace(reference, checkpoint=str(imported))
    run_index(tmp_path / "videos", tmp_path / "index", choice, FRAMES, CONFIG)
    searcher = Searcher(tmp_path / "index", CONFIG)
    scores, _, _ = evaluation_scores(
        reference, FrameCache(tmp_path / "index" / "frames.zarr"), [r.key for r in searcher.videos]
    )
    hits = searcher.search(QUERIES[:2], top_k=3)
    for row, query_hits in zip(scores[:2], hits, strict=True):
        assert [h.video_id for h in query_hits] == [searcher.videos[v].video_id for v in stable_order(row)]
        assert np.allclose([h.score for h in query_hits], row[stable_order(row)], atol=1e-3)


@pytest.fixture()
def propy_choice(tmp_path: Path, tiny_clip_weights: Path) -> ModelChoice:
    return trained_choice(tmp_path, "propy", tiny_clip_weights)


def test_reindexing_adds_new_updates_changed_and_removes_deleted_files(tmp_path: Path, propy_choice) -> None:
    paths = make_videos(tmp_path / "videos", (2, 3, 3, 2))
    out = tmp_path / "index"
    run_index(tmp_path / "videos", out, propy_choice, FRAMES, CONFIG)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "vectors").glob("*.npz")}
    make_video(tmp_path / "videos" / "new.mp4", 2, seed=9)
    make_video(paths[2], 4, seed=7)  # changed content
    removed_key = next(r.key for r in Searcher(out, CONFIG).videos if r.video_id == "clip0")
    paths[0].unlink()
    stat = paths[3].stat()
    os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content
    summary = run_index(tmp_path / "videos", out, propy_choice, FRAMES, CONFIG)
    assert (summary.added, summary.updated, summary.removed) == (["new.mp4"], ["clip2.mp4"], ["clip0.mp4"])
    assert summary.unchanged == 2 and summary.videos == 4
    after = {p.name: p.stat().st_mtime_ns for p in (out / "vectors").glob("*.npz")}
    kept = set(before) & set(after)
    assert len(kept) == 3 and sum(before[n] == after[n] for n in kept) == 2  # only the changed one rewritten
    assert not (out / "frames.zarr" / removed_key).exists() and not (out / "thumbs" / removed_key).exists()
    searcher = Searcher(out, CONFIG)
    assert sorted(r.video_id for r in searcher.videos) == ["clip2", "clip3", "new", "part/clip1"]
    assert {h.video_id for h in searcher.search(QUERIES[:1], top_k=10)[0]} == {"clip2", "clip3", "new", "part/clip1"}
    assert run_index(tmp_path / "videos", out, propy_choice, FRAMES, CONFIG).unchanged == 4


def test_an_interrupted_index_finishes_without_redoing_finished_videos(
    tmp_path: Path, propy_choice, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_videos(tmp_path / "videos")
    out = tmp_path / "index"
    write = index_module._write_video
    written = []

    def crash_after_two(*args, **kwargs) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # the run is killed while it encodes the third video
        write(*args, **kwargs)
        written.append(args[2].path)

    monkeypatch.setattr(index_module, "_write_video", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_index(tmp_path / "videos", out, propy_choice, FRAMES, dataclasses.replace(CONFIG, batch_videos=1))
    monkeypatch.undo()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "vectors").glob("*.npz")}
    frames = {p.parent.name: p.stat().st_mtime_ns for p in (out / "frames.zarr").glob("*/zarr.json")}
    assert len(finished) == 2 and len(frames) == 5 and not (out / "store").exists()
    unfinished = sorted({"clip0.mp4", "part/clip1.mp4", "clip2.mp4", "clip3.mp4", "clip4.mp4"} - set(written))
    (tmp_path / "videos" / unfinished[-1]).unlink()  # deleted while its frames were cached but not encoded
    summary = run_index(tmp_path / "videos", out, propy_choice, FRAMES, CONFIG)
    assert summary.unchanged == 2 and sorted(summary.added) == unfinished[:-1]
    assert all((out / "vectors" / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    now = {p.parent.name: p.stat().st_mtime_ns for p in (out / "frames.zarr").glob("*/zarr.json")}
    assert now == {key: mtime for key, mtime in frames.items() if key != video_key(unfinished[-1])}
    assert len(Searcher(out, CONFIG).videos) == 4


def test_an_index_of_another_model_config_or_folder_is_refused(tmp_path: Path, propy_choice, tiny_clip_weights) -> None:
    make_videos(tmp_path / "videos", (2, 3))
    out = tmp_path / "index"
    run_index(tmp_path / "videos", out, propy_choice, FRAMES, CONFIG)
    with pytest.raises(PipelineError, match="built by 'propy' with other .*config.* than this 'clip_mil' run"):
        run_index(tmp_path / "videos", out, trained_choice(tmp_path, "clip_mil", tiny_clip_weights), FRAMES, CONFIG)
    with pytest.raises(PipelineError, match="other frames than this 'propy' run"):
        run_index(tmp_path / "videos", out, propy_choice, dataclasses.replace(FRAMES, fps=2.0), CONFIG)
    retrained = dataclasses.replace(propy_choice, max_words=MAX_WORDS + 4)
    with pytest.raises(PipelineError, match="other encoding"):
        run_index(tmp_path / "videos", out, retrained, FRAMES, CONFIG)
    (tmp_path / "other").mkdir()
    with pytest.raises(PipelineError, match="indexes the folder .*choose another --out"):
        run_index(tmp_path / "other", out, propy_choice, FRAMES, CONFIG)
    assert len(Searcher(out, CONFIG).videos) == 2  # nothing of the index was touched


def test_bad_files_are_reported_and_skipped(tmp_path: Path, propy_choice) -> None:
    videos = tmp_path / "videos"
    make_videos(videos, (2, 3))
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "noise.mkv").write_bytes(np.random.default_rng(0).bytes(5000))
    outside = make_video(tmp_path / "elsewhere" / "secret.mp4", 2)
    (videos / "link.mp4").symlink_to(outside)
    (videos / "notes.txt").write_text("not a video")
    summary = run_index(videos, tmp_path / "index", propy_choice, FRAMES, CONFIG)
    reasons = {f["path"]: f["reason"] for f in summary.failures}
    assert set(reasons) == {"empty.mp4", "noise.mkv", "link.mp4"} and summary.videos == 2
    assert "empty file" in reasons["empty.mp4"] and "outside the folder" in reasons["link.mp4"]
    listed = [json.loads(line) for line in (tmp_path / "index" / "failures.jsonl").read_text().splitlines()]
    assert {f["path"] for f in listed} == set(reasons)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "pipeline.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_command_line_json_and_queries_file(tmp_path: Path, propy_choice, tiny_clip_weights: Path) -> None:
    make_videos(tmp_path / "videos", (2, 3, 4))
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "base": {"clip_weights": str(tiny_clip_weights)},
                "decode": {"size": 64, "workers": 1},
                "train_propy": {"max_words": MAX_WORDS, "tail_fix": True},
                "search": {"device": "cpu"},
            }
        )
    )
    out = tmp_path / "index"
    common = ("--params", str(params))
    built = run_cli(
        *common, "index", str(tmp_path / "videos"), "--out", str(out), "--checkpoint", propy_choice.checkpoint
    )
    assert built.returncode == 0, built.stderr
    assert "indexed 3 new" in built.stdout
    recorded = json.loads((out / "index.json").read_text())["model"]  # ProPy encodes as params.yaml trained it
    assert (recorded["max_words"], recorded["tail_fix"]) == (MAX_WORDS, True)
    found = run_cli(*common, "search", str(out), "a bright bar", "--json", "--top-k", "2")
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)  # stdout is the JSON array alone
    assert len(results) == 2 and {"video_id", "path", "start", "end", "score", "thumbnail"} <= set(results[0])
    assert results[0]["score"] >= results[1]["score"]
    queries = tmp_path / "queries.txt"
    queries.write_text("a bright bar\n\nsomething moves\n")
    lines = run_cli(*common, "search", str(out), "--queries", str(queries), "--top-k", "3").stdout.splitlines()
    assert [json.loads(line)["query"] for line in lines] == ["a bright bar", "something moves"]
    first = json.loads(lines[0])["results"]
    assert [(r["video_id"], r["start"]) for r in first[:2]] == [(r["video_id"], r["start"]) for r in results]
    assert np.allclose([r["score"] for r in first[:2]], [r["score"] for r in results], atol=1e-5)
    with pytest.raises(PipelineError, match="is not a search index"):
        Searcher(tmp_path / "nowhere", CONFIG)


def test_video_ids_are_relative_paths_and_keys_are_safe_and_unique(tmp_path: Path) -> None:
    for name in ("a.mp4", "a.MKV", "talks/week 1/b.mp4", ".hidden.mp4", ".cache/c.mp4", "d.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files, refused = scan_folder(tmp_path, ("mp4", "mkv"))
    assert [(f.video_id, f.path) for f in files] == [
        ("a.MKV", "a.MKV"),
        ("a.mp4", "a.mp4"),
        ("talks/week 1/b", "talks/week 1/b.mp4"),
    ]
    assert not refused and len({f.key for f in files}) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", f.key) for f in files)
    assert video_key("talks/week 1/b.mp4") != video_key("talks/week_1/b.mp4")
