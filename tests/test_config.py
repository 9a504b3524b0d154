"""Typed configs from params sections: nested dataclasses, type checks, clear errors, and CLI overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from pipeline import cli
from stages.data.config import config_from_dict
from stages.data.errors import PipelineError


@dataclass(frozen=True)
class Inner:
    size: int = 1
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outer:
    lr: float = 0.1
    inner: Inner = field(default_factory=Inner)
    scheduler: str | None = None


def test_nested_and_coerced_values() -> None:
    cfg = config_from_dict(Outer, {"lr": "1e-3", "inner": {"size": 3, "names": ["a", "b"]}}, "params.yaml:x")
    assert cfg == Outer(lr=1e-3, inner=Inner(3, ("a", "b")))
    assert config_from_dict(Outer, {"lr": 2}, "x").lr == 2.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"lrr": 1.0}, r"params.yaml:x: unknown key\(s\) \['lrr'\] \(did you mean 'lr'\?\); valid keys are"),
        ({"lr": "fast"}, r"params.yaml:x.lr: expected a number"),
        ({"inner": {"size": True}}, r"params.yaml:x.inner.size: expected an integer"),
        ({"inner": 3}, r"params.yaml:x.inner: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        config_from_dict(Outer, data, "params.yaml:x")


def test_cli_reports_user_errors_without_traceback(tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"base: {{dataset: toy, cache_dir: {tmp_path}}}\nreport: {{output_dir: {tmp_path}}}\n")
    result = CliRunner().invoke(cli, ["--params", str(params), "report", "-s", "colour=red"])
    assert result.exit_code == 1
    assert "unknown key(s) ['colour']" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["--params", str(params), "-s", "base.metrics_dir=" + str(tmp_path), "report"])
    assert result.exit_code == 1 and "no metrics in" in result.output


def _cli(tmp_path: Path, files: dict[str, dict], *args: str) -> Result:
    """Run the CLI on params files written from `files` (name -> content), in `tmp_path`."""
    for name, content in files.items():
        (tmp_path / name).write_text(yaml.safe_dump(content))
    layered = [arg for name in files for arg in ("--params", str(tmp_path / name))]
    return CliRunner().invoke(cli, [*layered, *args])


BASE = {"base": {"dataset": "toy"}, "decode": {"size": 64, "fps": 2.0}, "train_propy": {"lr": 0.01, "epochs": 3}}
ANET = {"base": {"dataset": "anet"}, "decode": {"video_dir": "data/anet/videos", "fps": 1.0}}


def test_params_files_layer_and_the_config_command_says_where_each_value_came_from(tmp_path: Path) -> None:
    result = _cli(tmp_path, {"p.yaml": BASE, "anet.yaml": ANET}, "-s", "decode.workers=4", "config", "decode")
    assert result.exit_code == 0, result.output
    lines = {line.split(":")[0].strip(): line for line in result.stdout.splitlines()}
    assert lines["size"].endswith(f"size: 64  # {tmp_path / 'p.yaml'}")  # from the first file
    assert lines["fps"].endswith(f"fps: 1.0  # {tmp_path / 'anet.yaml'}")  # the later file wins
    assert lines["video_dir"].endswith(f"# {tmp_path / 'anet.yaml'}")
    assert lines["workers"].endswith("workers: 4  # -s decode.workers=4")
    assert lines["codec"].endswith("codec: zstd  # default")


def test_a_section_no_file_has_can_be_overridden(tmp_path: Path) -> None:
    result = _cli(tmp_path, {"anet.yaml": ANET}, "-s", "evaluate.protocol.split=test", "config", "evaluate")
    assert result.exit_code == 0, result.output
    assert "    split: test  # -s evaluate.protocol.split=test" in result.stdout


def test_an_unknown_override_is_named_with_the_closest_key(tmp_path: Path) -> None:
    result = _cli(tmp_path, {"p.yaml": BASE}, "-s", "lrr=1e-3", "config", "train-propy")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "override -s lrr=1e-3 (train_propy.lrr): unknown key(s) ['lrr'] (did you mean 'lr'?)" in result.output
    result = _cli(tmp_path, {"p.yaml": BASE}, "-s", "evalute.protocol.split=val", "config", "evaluate")
    assert "did you mean 'evaluate'?" in result.output  # a misspelt section is relative to the stage's own
    result = _cli(tmp_path, {"p.yaml": {**BASE, "train_propy": {"lrr": 1}}}, "config", "train-propy")
    assert f"{tmp_path / 'p.yaml'}:train_propy.lrr: unknown key(s) ['lrr'] (did you mean 'lr'?)" in result.output


def test_a_dataset_s_files_replace_the_others_when_layered(tmp_path: Path) -> None:
    files = {"p.yaml": {"prepare": {"files": {"train": "a", "val": "b", "test": "c"}, "format": "tvr"}}}
    files["anet.yaml"] = {"prepare": {"files": {"train": "x", "val": "y"}, "format": "activitynet"}}
    result = _cli(tmp_path, files, "config", "prepare")
    assert result.exit_code == 0, result.output
    assert "files: {train: x, val: y}" in result.stdout and "format: activitynet" in result.stdout


def test_a_stage_logs_where_its_non_default_values_came_from(tmp_path: Path) -> None:
    native = tmp_path / "train.jsonl"
    native.write_text(json.dumps({"desc_id": 1, "desc": "a", "vid_name": "v", "duration": 5, "ts": [0, 1]}) + "\n")
    files = {
        "p.yaml": {**BASE, "prepare": {"format": "tvr"}},
        "toy.yaml": {"prepare": {"files": {"train": str(native)}}},
    }
    result = _cli(tmp_path, files, "-s", f"base.cache_dir={tmp_path / 'cache'}", "prepare")
    assert result.exit_code == 0, result.output
    assert f"  files.train: {native}  # {tmp_path / 'toy.yaml'}" in result.stderr
    assert f"  dataset: toy  # {tmp_path / 'p.yaml'}" in result.stderr
    assert f"  cache_dir: {tmp_path / 'cache'}  # -s base.cache_dir=" in result.stderr
    assert "format" not in result.stderr  # tvr is the default: not listed


def test_a_stage_help_lists_its_keys_defaults_and_comments() -> None:
    result = CliRunner().invoke(cli, ["decode", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Keys of params section `decode`" in text
    assert "video_dir = data/synthetic/videos videos are found as <video_dir>/<video_id>.<extension>" in text
    assert "max_failures = 0 the stage fails when more videos than this could not be decoded" in text
    help_propy = " ".join(CliRunner().invoke(cli, ["train-propy", "--help"]).output.split())
    assert "model.pyramid.num_frames = 32 Nf: frames sampled per video" in help_propy
    help_clip = " ".join(CliRunner().invoke(cli, ["pretrain-clip", "--help"]).output.split())
    assert "arch.embed_dim = 128" in help_clip  # a nested default is the field's own (the tiny CLIP), not ClipArch()


def test_a_missing_params_file_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--params", str(tmp_path / "nope.yaml"), "config", "decode"])
    assert result.exit_code == 1 and "params file" in result.output and "does not exist" in result.output
