"""Typed configs from params sections: nested dataclasses, type checks, clear errors, and CLI overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner

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
        ({"lrr": 1.0}, r"params.yaml:x: unknown key\(s\) \['lrr'\]; valid keys are"),
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
