"""The `prepare` stage: writes the unified file, fails listing every bad line, or drops them when asked; its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from stages.data.config import BaseConfig, config_from_dict
from stages.data.errors import PipelineError
from stages.data.prepare import PrepareConfig, dropped_path, problems_path, run_prepare
from stages.data.schema import read_queries

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).parent / "data" / "annotations"


def tvr_line(desc_id: int, vid: str = "show_clip_1", ts: list[float] | None = None) -> str:
    return json.dumps(
        {"desc_id": desc_id, "desc": f"caption {desc_id}", "vid_name": vid, "duration": 60, "ts": ts or [1, 2]}
    )


@pytest.fixture
def base(tmp_path: Path) -> BaseConfig:
    return BaseConfig(dataset="toy", cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, str]:
    """A train file with two bad lines (4: moment past the end, 5: bad JSON) and a val file repeating a query id."""
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("\n".join([tvr_line(1), tvr_line(2), tvr_line(3, "show_clip_2"), tvr_line(4, ts=[5, 70]), "{"]))
    val.write_text(tvr_line(6, "show_clip_3") + "\n" + tvr_line(2, "show_clip_3") + "\n")
    return {"train": str(train), "val": str(val)}


def test_prepare_writes_the_unified_file_and_a_summary(base: BaseConfig, capsys: pytest.CaptureFixture) -> None:
    cfg = PrepareConfig(files={"train": str(SAMPLES / "tvr_sample_release.jsonl")})
    result = run_prepare(base, cfg)
    assert read_queries(base.annotations_path) == result.queries and len(result.queries) == 3
    assert base.annotations_path == Path(base.cache_dir) / "toy" / "annotations.jsonl"
    assert "train: 3 queries, 2 videos" in capsys.readouterr().out
    assert not dropped_path(base).exists() and not problems_path(base).exists()


def test_prepare_fails_listing_every_bad_line_and_keeps_the_old_output(
    base: BaseConfig, bad_files: dict[str, str]
) -> None:
    base.annotations_path.parent.mkdir(parents=True)
    base.annotations_path.write_text("previous run\n")
    with pytest.raises(PipelineError) as error:
        run_prepare(base, PrepareConfig(files=bad_files))
    message = str(error.value)
    assert f"{bad_files['train']}:4: moment [5, 70] is outside [0, 60]" in message
    assert f"{bad_files['train']}:5: unparsable JSON" in message
    assert f"{bad_files['val']}:2: duplicate query id '2' (first at {bad_files['train']}:2)" in message
    assert message.startswith("3 bad annotation line(s)") and "drop_bad_lines" in message
    assert base.annotations_path.read_text() == "previous run\n"
    assert len(problems_path(base).read_text().splitlines()) == 3


def test_prepare_lists_many_bad_lines_in_a_file(base: BaseConfig, tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join([tvr_line(0)] + [tvr_line(i, ts=[0, 99]) for i in range(1, 251)]) + "\n")
    with pytest.raises(PipelineError) as error:
        run_prepare(base, PrepareConfig(files={"train": str(path)}))
    message = str(error.value)
    assert f"{path}:21:" in message and f"{path}:22:" not in message and "... and 230 more" in message
    assert str(problems_path(base)) in message
    listed = problems_path(base).read_text().splitlines()
    assert len(listed) == 250 and listed[-1].startswith(f"{path}:251: moment [0, 99]")


def test_drop_bad_lines_writes_the_rest_and_the_dropped_list(
    base: BaseConfig, bad_files: dict[str, str], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(PipelineError):
        run_prepare(base, PrepareConfig(files=bad_files))  # leaves a problems file that success must remove
    result = run_prepare(base, PrepareConfig(files=bad_files, drop_bad_lines=True))
    assert [q.query_id for q in read_queries(base.annotations_path)] == ["1", "2", "3", "6"]
    dropped = [json.loads(line) for line in dropped_path(base).read_text().splitlines()]
    assert [(d["file"], d["line"]) for d in dropped] == [
        (bad_files["train"], 4),
        (bad_files["train"], 5),
        (bad_files["val"], 2),
    ]
    assert dropped[1]["text"] == "{" and dropped[1]["reason"].startswith("unparsable JSON")
    assert dropped[0]["text"] == tvr_line(4, ts=[5, 70])
    assert len(result.bad_lines) == 3 and not problems_path(base).exists()
    out = capsys.readouterr().out
    assert f"dropped 3 bad line(s), listed in {dropped_path(base)}" in out
    assert "train: 3 queries, 2 videos" in out and "val: 1 queries, 1 videos" in out


def test_prepare_reads_durations_and_merges_qvhighlights_sources(base: BaseConfig) -> None:
    charades = PrepareConfig(
        format="charades",
        files={"test": str(SAMPLES / "charades_sta_sample.txt")},
        durations=(str(SAMPLES / "Charades_v1_sample.csv"),),
    )
    assert [q.duration for q in run_prepare(base, charades).queries] == [33.67, 33.67, 20.25]
    qvh = PrepareConfig(
        format="qvhighlights", files={"train": str(SAMPLES / "highlight_sample_release.jsonl")}, merge_sources=True
    )
    assert [q.video_id for q in run_prepare(base, qvh).queries] == ["bP5KfdFJzC4", "NUsG9BgSes0"]


def test_params_yaml_prepare_section_is_a_valid_config() -> None:
    section = yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]
    cfg = config_from_dict(PrepareConfig, section, "params.yaml:prepare")
    assert cfg == replace(PrepareConfig(), annotation_dir="data/synthetic/annotations")
    dvc_prepare = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    assert "${prepare.annotation_dir}" in dvc_prepare["deps"]  # DVC tracks the folder of the dataset's files
    with pytest.raises(PipelineError, match="format 'msrvtt' is not one of"):
        config_from_dict(PrepareConfig, {"format": "msrvtt"}, "params.yaml:prepare")


def test_files_outside_the_tracked_folder_are_refused(base: BaseConfig, bad_files: dict[str, str]) -> None:
    inside = PrepareConfig(files={"train": str(SAMPLES / "tvr_sample_release.jsonl")}, annotation_dir=str(SAMPLES))
    assert len(run_prepare(base, inside).queries) == 3
    outside = replace(inside, files={"train": bad_files["train"]})
    with pytest.raises(PipelineError, match=r"prepare.files.train .* is not inside prepare.annotation_dir"):
        run_prepare(base, outside)


def run_cli(tmp_path: Path, files: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"base": {"dataset": "toy", "cache_dir": str(tmp_path / "cache")}, "prepare": {"files": files}})
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "pipeline.py"), "--params", str(params), "prepare", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_cli_reports_bad_lines_without_a_traceback_and_drops_them_on_request(
    tmp_path: Path, bad_files: dict[str, str]
) -> None:
    failed = run_cli(tmp_path, bad_files)
    assert failed.returncode == 1
    assert "\nError: 3 bad annotation line(s)" in "\n" + failed.stderr and "Traceback" not in failed.stderr
    assert f"{bad_files['train']}:4:" in failed.stderr and f"{bad_files['val']}:2:" in failed.stderr
    dropped = run_cli(tmp_path, bad_files, "-s", "drop_bad_lines=true")
    assert dropped.returncode == 0, dropped.stderr
    assert len(read_queries(tmp_path / "cache" / "toy" / "annotations.jsonl")) == 4
