#!/usr/bin/env python
"""PRVR pipeline command line: one sub-command per stage, each reading its section of `params.yaml`.

    python pipeline.py --help                     # every stage, one line each
    python pipeline.py decode -s workers=4        # one stage, overriding a key of its section
    python pipeline.py -s base.dataset=tvr decode # override a key of another section
    dvc repro                                     # the whole graph of dvc.yaml (each stage calls this file)

This file is the only place that reads `params.yaml` or parses options: it turns a section into a typed config
(a dataclass of the stage's module) and calls one library function. User mistakes end with `Error: ...` on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from stages.data.config import BaseConfig, config_from_dict
from stages.data.errors import PipelineError

T = TypeVar("T")


class Params:
    """`params.yaml` plus `-s KEY=VALUE` overrides.

    An override whose first dotted part names a section (`base.seed=1`, `decode.fps=2`) is absolute; any other
    (`fps=2`) belongs to the section of the command that runs.
    """

    def __init__(self, path: str, overrides: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.overrides = overrides
        self.default_section = ""

    @functools.cached_property
    def data(self) -> dict[str, Any]:
        """The parsed params file (empty if it does not exist)."""
        if not self.path.is_file():
            return {}
        try:
            return yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PipelineError(f"{self.path} is not valid YAML: {exc}") from exc

    def use(self, section: str, local_overrides: tuple[str, ...] = ()) -> Params:
        """Make `section` the target of relative overrides and add the command's own overrides."""
        self.default_section = section
        self.overrides = (*self.overrides, *local_overrides)
        return self

    def section(self, name: str) -> dict[str, Any]:
        """A copy of one section with its overrides applied."""
        merged = json.loads(json.dumps(self.data.get(name) or {}))
        for item in self.overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise PipelineError(f"override {item!r} is not KEY=VALUE")
            parts = key.split(".")
            if parts[0] in self.data or parts[0] == "base":
                section, parts = parts[0], parts[1:]
            else:
                section = self.default_section
            if section != name or not parts:
                continue
            target = merged
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = yaml.safe_load(raw)
        return merged

    def base(self) -> BaseConfig:
        """The typed `base` section."""
        return config_from_dict(BaseConfig, self.section("base"), f"{self.path}:base")

    def config(self, name: str, cls: type[T]) -> T:
        """The typed config of section `name`."""
        return config_from_dict(cls, self.section(name), f"{self.path}:{name}")


class StageGroup(click.Group):
    """A click group that turns PipelineError into a one-line error message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="The parameters file.")
@click.option(
    "-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value, e.g. -s base.seed=1."
)
@click.pass_context
def cli(ctx: click.Context, params_path: str, overrides: tuple[str, ...]) -> None:
    """Partially relevant video retrieval: decode once, extract CLIP features, train, evaluate, report."""
    ctx.obj = Params(params_path, overrides)


F = TypeVar("F", bound=Callable[..., Any])


def section_overrides(fn: F) -> F:
    """Add `-s/--set KEY=VALUE` (relative to the command's own section) to a stage command."""
    return click.option(
        "-s",
        "--set",
        "local_overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a key of this stage's params section (or base.KEY / other.KEY).",
    )(fn)


# --------------------------------------------------------------------------------------------------------------
# Weights and reference checks
# --------------------------------------------------------------------------------------------------------------


@cli.command("convert-weights")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
def convert_weights(src: str, dst: str) -> None:
    """Convert the OpenAI TorchScript CLIP archive into a plain safetensors file (once)."""
    from stages.train.models.clip_backbone import convert_torchscript

    digest = convert_torchscript(src, dst)
    click.echo(f"wrote {dst}\nsha256 {digest}")


@cli.command("verify-reference")
@click.argument("model")
@click.argument("prefix")
def verify_reference(model: str, prefix: str) -> None:
    """Compare our port with an official-code fixture (PREFIX_*); exit 0 iff every error is at most 1e-4."""
    import stages.train.models  # noqa: F401 - model modules register their reference checks
    from stages.train.reference import TOLERANCE, run_reference_check

    errors = run_reference_check(model, prefix)
    click.echo(json.dumps(errors, indent=1))
    if not errors or max(errors.values()) > TOLERANCE:
        raise click.exceptions.Exit(1)


if __name__ == "__main__":
    cli()
