#!/usr/bin/env python
"""PRVR pipeline command line: one sub-command per stage, each reading its section of `params.yaml`.

    python pipeline.py --help                     # every stage, one line each
    python pipeline.py decode --help              # a stage's params keys: default and what each does
    python pipeline.py decode -s workers=4        # one stage, overriding a key of its section
    python pipeline.py -s base.dataset=tvr decode # override a key of another section
    python pipeline.py --params params.yaml --params anet.yaml decode   # params.yaml plus a dataset's differences
    python pipeline.py --params params.yaml --params anet.yaml config decode   # the values used, and from where
    dvc repro                                     # the whole graph of dvc.yaml (each stage calls this file)

This file is the only place that reads params files or parses options: it turns a section into a typed config
(a dataclass of the stage's module) and calls one library function. Each stage logs, on stderr, the values that
differ from the code's defaults and which file or override set them. User mistakes end with `Error: ...` on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from stages.data.config import (
    BaseConfig,
    config_from_dict,
    describe_config,
    did_you_mean,
    flatten,
    replaced_when_layered,
    walk_config,
)
from stages.data.errors import PipelineError

T = TypeVar("T")


SECTIONS = {  # params section -> the config dataclass it builds ("module:Class"); `baselines`: one per entry
    "base": "stages.data.config:BaseConfig",
    "synth": "stages.synthetic.synth:SynthConfig",
    "pretrain_clip": "stages.synthetic.pretrain_clip:PretrainClipConfig",
    "prepare": "stages.data.prepare:PrepareConfig",
    "decode": "stages.extract.decode:DecodeConfig",
    "features": "stages.extract.features:FeaturesConfig",
    "train_propy": "stages.train.train_propy:TrainPropyConfig",
    "baselines": "stages.train.train_baseline:BaselineStageConfig",
    "evaluate": "stages.evaluate.evaluator:EvaluateConfig",
    "report": "stages.evaluate.report:ReportConfig",
}
DEFAULT_PARAMS = "params.yaml"


def section_config(section: str) -> type:
    """The config dataclass of a params section (imported on first use: stage modules import torch)."""
    module, _, name = SECTIONS[section].partition(":")
    return getattr(importlib.import_module(module), name)


class Params:
    """Layered params files plus `-s KEY=VALUE` overrides, remembering where every value came from.

    Files are read in order and later ones win key by key (mappings merge, anything else is replaced), so
    `--params params.yaml --params anet.yaml` is params.yaml with anet.yaml's differences. An override whose first
    dotted part names a section (one of SECTIONS, or of a file) is absolute (`base.seed=1`, `evaluate.protocol.split=
    val`); any other (`fps=2`) belongs to the section of the command that runs. Each stage logs which file (or
    override) set every value that differs from the code's default.
    """

    def __init__(self, paths: Sequence[str], overrides: tuple[str, ...], defaulted: bool = False) -> None:
        self.paths = [Path(path) for path in paths]
        self.overrides = overrides
        self.defaulted = defaulted  # the files are the default (a missing params.yaml then means code defaults)
        self.default_section = ""
        self.quiet = False  # no log of the values set (`config` prints them itself)
        self._logged: set[str] = set()
        self._noted: set[str] = set()
        self._merged: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}

    def describe(self) -> str:
        """The files, in the order they are layered."""
        return " < ".join(str(path) for path in self.paths) or "(no params file)"

    @functools.cached_property
    def layers(self) -> list[tuple[str, dict[str, Any]]]:
        """(file, parsed mapping) of every params file, in order."""
        layers = []
        for path in self.paths:
            if not path.is_file():
                if self.defaulted:
                    continue
                raise PipelineError(f"params file {path} does not exist")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise PipelineError(f"{path} is not valid YAML: {exc}") from exc
            if not isinstance(data, dict):
                raise PipelineError(f"{path} must be a mapping of sections, got {type(data).__name__}")
            layers.append((str(path), data))
        return layers

    def _layered(self, name: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Section `name` of every file merged in order, and where each of its values came from."""
        if name not in self._merged:
            data: dict[str, Any] = {}
            origins: dict[str, str] = {}
            for label, layer in self.layers:
                if name in layer:
                    _merge(data, layer[name] or {}, origins, label, _whole_values(name))
            self._merged[name] = data, origins
        return self._merged[name]

    @property
    def file_sections(self) -> set[str]:
        """The sections the files have."""
        return {name for _, layer in self.layers for name in layer}

    @property
    def sections(self) -> set[str]:
        """Section names: those of the configs, and any other section a file has."""
        return set(SECTIONS) | self.file_sections

    def use(self, section: str, local_overrides: tuple[str, ...] = ()) -> Params:
        """Make `section` the target of relative overrides and add the command's own overrides."""
        self.default_section = section
        self.overrides = (*self.overrides, *local_overrides)
        return self

    def _targets(self) -> list[tuple[str, str, list[str], Any]]:
        """(override, section, key path in it, value) of every override."""
        targets = []
        for item in self.overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise PipelineError(f"override {item!r} is not KEY=VALUE")
            parts = key.split(".")
            if parts[0] in self.sections:
                section, parts = parts[0], parts[1:]
            else:
                section = self.default_section
            if not parts or not section:
                raise PipelineError(f"override -s {item}: name a key of a section, e.g. -s decode.fps=2")
            targets.append((item, section, parts, yaml.safe_load(raw)))
        return targets

    def section(self, name: str) -> tuple[dict[str, Any], dict[str, str]]:
        """A copy of one section with its overrides applied, and where each of its keys came from."""
        layered, origins = self._layered(name)
        merged, local = copy.deepcopy(layered), dict(origins)
        for item, section, parts, value in self._targets():
            if section != name:
                continue
            target = merged
            for part in parts[:-1]:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            target[parts[-1]] = value
            _record(local, ".".join(parts), value, f"-s {item}")
        return merged, local

    def base(self) -> BaseConfig:
        """The typed `base` section."""
        return self.config("base", BaseConfig)

    def config(self, name: str, cls: type[T], entry: str = "") -> T:
        """The typed config of section `name` (or of one `entry` of it, e.g. `baselines.msl`)."""
        data, origins = self.section(name)
        self._note_unread_default(name)
        where = name
        for depth, part in enumerate(entry.split(".") if entry else ()):
            if not isinstance(data, dict) or (part not in data and depth == 0):
                there = sorted(data) if isinstance(data, dict) else []
                raise PipelineError(f"{self.describe()} has no `{where}.{part}` entry; entries there: {there}")
            data, where = data.get(part) or {}, f"{where}.{part}"  # a missing inner part takes the defaults
            origins = {k[len(part) + 1 :]: v for k, v in origins.items() if k.startswith(f"{part}.")}
        built = config_from_dict(cls, data, where, origins, also_suggest=self.sections)
        self._log(where, built, origins)
        return built

    def _note_unread_default(self, name: str) -> None:
        """When no file given has section `name` but an unread params.yaml has: say that code defaults are used."""
        default = Path(DEFAULT_PARAMS)
        if name in self.file_sections or name in self._noted or not default.is_file():
            return
        if default.resolve() in [path.resolve() for path in self.paths]:
            return
        if name in (yaml.safe_load(default.read_text()) or {}):
            self._noted.add(name)
            print(
                f"note: {self.describe()} has no `{name}` section, so the code's defaults are used, not those of "
                f"{DEFAULT_PARAMS}; to layer on it, name it first: --params {DEFAULT_PARAMS} --params ...",
                file=sys.stderr,
            )

    def _log(self, where: str, built: Any, origins: dict[str, str]) -> None:
        """Print once per section which file or override set each value that is not the code's default."""
        if self.quiet or where in self._logged or os.environ.get("RANK", "0") != "0":
            return
        self._logged.add(where)
        defaults = flatten(type(built)())
        changed = {key: value for key, value in flatten(built).items() if defaults.get(key, _UNSET) != value}
        if changed:
            lines = [f"  {key}: {_show(value)}  # {origins.get(key, 'default')}" for key, value in changed.items()]
            print(f"{where} ({self.describe()}), values other than the defaults:", *lines, sep="\n", file=sys.stderr)

    def effective(self, name: str, cls: type, entry: str = "") -> list[str]:
        """The section as YAML, every value commented with where it came from (`default` when nowhere)."""
        built = self.config(name, cls, entry)
        origins = self.section(name)[1]
        prefix = f"{entry}." if entry else ""
        lines = [f"# {name}{'.' + entry if entry else ''}: {self.describe()}, then -s overrides"]
        lines += [f"{name}:"] + ([f"  {entry}:"] if entry else [])
        indent = "    " if entry else "  "
        lines += _yaml_lines(built, indent, lambda key: origins.get(prefix + key, "default"))
        return lines


_UNSET = object()


def _merge(
    target: dict[str, Any],
    update: dict[str, Any],
    origins: dict[str, str],
    label: str,
    whole: Callable[[str], bool],
    prefix: str = "",
) -> None:
    """Merge `update` into `target` key by key (nested mappings merge unless `whole(dotted key)`), recording
    `label` as the origin of every value it sets."""
    for key, value in update.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(target.get(key), dict) and not whole(path):
            _merge(target[key], value, origins, label, whole, f"{path}.")
        else:
            target[key] = copy.deepcopy(value)
            _record(origins, path, value, label)


def _whole_values(section: str) -> Callable[[str], bool]:
    """Which mappings of a section a later file replaces whole (e.g. `prepare.files`, a dataset's splits)."""
    if section not in SECTIONS:
        return lambda path: False
    cls = section_config(section)
    if section == "baselines":  # one entry per model
        return lambda path: "." in path and replaced_when_layered(cls, path.split(".")[1:])
    return lambda path: replaced_when_layered(cls, path.split("."))


def _record(origins: dict[str, str], path: str, value: Any, label: str) -> None:
    """`label` is where the value at `path` came from: every leaf of it when it is a mapping (set as a whole)."""
    for key in [k for k in origins if k == path or k.startswith(f"{path}.")]:
        del origins[key]
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _record(origins, f"{path}.{key}", item, label)
    else:
        origins[path] = label


def _show(value: Any) -> str:
    """A value as one line of YAML (tuples as lists)."""
    plain = json.loads(json.dumps(value, default=str))
    return yaml.safe_dump(plain, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _yaml_lines(config: Any, indent: str, origin: Callable[[str], str]) -> list[str]:
    """A config dataclass as YAML lines, each leaf commented with `origin(dotted key)`."""
    lines = []
    for field in walk_config(config):
        pad = indent + "  " * field.depth
        lines.append(
            f"{pad}{field.name}:" if field.nested else f"{pad}{field.name}: {_show(field.value)}  # {origin(field.key)}"
        )
    return lines


class StageGroup(click.Group):
    """A click group that lists each command's whole first docstring line and turns PipelineError into a one-line
    error message with exit status 1."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if cmd.help and not cmd.short_help:
            cmd.short_help = cmd.help.strip().splitlines()[0]
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from None


class StageCommand(click.Command):
    """A stage's command: `--help` ends with every key of its params section, its default and its comment."""

    def __init__(self, *args: Any, section: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        rows = [
            (f"{doc.key} = {_show(doc.default)}", doc.help) for doc in describe_config(section_config(self.section))
        ]
        title = f"Keys of params section `{self.section}` (-s KEY=VALUE; default, then what it does)"
        if self.section == "baselines":
            title = "Keys of each entry `baselines.NAME` (-s NAME.KEY=VALUE; the model's: `config train-baseline NAME`)"
        with formatter.section(title):
            formatter.write_dl(rows, col_max=48)


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option(
    "--params",
    "params_paths",
    multiple=True,
    default=(DEFAULT_PARAMS,),
    show_default=True,
    help="A params file; give several to layer them, later files winning (--params params.yaml --params anet.yaml).",
)
@click.option(
    "-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value, e.g. -s base.seed=1."
)
@click.pass_context
def cli(ctx: click.Context, params_paths: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Partially relevant video retrieval: decode once, extract CLIP features, train, evaluate, report."""
    defaulted = ctx.get_parameter_source("params_paths") is click.core.ParameterSource.DEFAULT
    ctx.obj = Params(params_paths, overrides, defaulted)


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


@cli.command("config")
@click.argument("stage")
@click.argument("name", required=False)
@click.pass_obj
def show_config(params: Params, stage: str, name: str | None) -> None:
    """Print the effective params section of STAGE (a command or a section), each value with where it came from.

    `config train-baseline NAME` prints the entry of baseline NAME, its model's keys included.
    """
    params.quiet = True
    command = cli.commands.get(stage)  # a stage's command knows its section; otherwise STAGE names one
    section = command.section if isinstance(command, StageCommand) else stage.replace("-", "_")
    if section not in SECTIONS:
        raise PipelineError(f"no stage or section {stage!r}{did_you_mean(stage, SECTIONS)}; sections: {list(SECTIONS)}")
    params.use(section)  # relative overrides (-s lr=1e-3) belong to it, as when the stage runs
    if section == "baselines":
        if not name:
            raise PipelineError("name the baseline: python pipeline.py config train-baseline NAME")
        click.echo("\n".join(_baseline_lines(params, name)))
        return
    click.echo("\n".join(params.effective(section, section_config(section))))


def _baseline_lines(params: Params, name: str) -> list[str]:
    """`config train-baseline NAME`: the entry, with the model's config dataclass in place of its `model` keys."""
    cfg, model = _baseline_config(params, name)
    lines = params.effective("baselines", section_config("baselines"), name)
    if model is None:
        return lines
    origins = params.section("baselines")[1]
    at = next(i for i, line in enumerate(lines) if line.startswith("    model:"))
    model_lines = _yaml_lines(model, "      ", lambda key: origins.get(f"{name}.model.{key}", "default"))
    return [*lines[:at], "    model:", *model_lines, *lines[at + 1 :]]


# --------------------------------------------------------------------------------------------------------------
# Weights and reference checks
# --------------------------------------------------------------------------------------------------------------


@cli.command("convert-weights")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
def convert_weights(src: str, dst: str) -> None:
    """Convert the OpenAI TorchScript CLIP archive into a plain safetensors file (once)."""
    from stages.models.clip_backbone import convert_torchscript

    digest = convert_torchscript(src, dst)
    click.echo(f"wrote {dst}\nsha256 {digest}")


@cli.command("verify-reference")
@click.argument("model")
@click.argument("prefix")
@click.option(
    "--checkpoint",
    type=click.Path(),
    help="Check this model file of ours (e.g. import-checkpoint's output) instead of the fixture's official weights.",
)
def verify_reference(model: str, prefix: str, checkpoint: str | None) -> None:
    """Compare our port with an official-code fixture (PREFIX_*); exit 0 iff every error is within the check's
    tolerance (1e-4; propy-train, our training loop against the official steps: 1e-5 relative)."""
    import stages.models  # noqa: F401 - model modules register their reference checks
    import stages.train.propy_reference  # noqa: F401 - registers propy-train
    from stages.models.imported import verify_checkpoint
    from stages.models.reference import reference_check

    check = reference_check(model)
    errors = verify_checkpoint(model, prefix, checkpoint) if checkpoint else check.fn(prefix)
    click.echo(json.dumps(errors, indent=1))
    if not errors or max(errors.values()) > check.tolerance:
        raise click.exceptions.Exit(1)


# --------------------------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------------------------


@cli.command("prepare", cls=StageCommand, section="prepare")
@section_overrides
@click.pass_obj
def prepare(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Convert the dataset's native annotation files into the unified annotations.jsonl."""
    from stages.data.prepare import PrepareConfig, run_prepare

    params.use("prepare", local_overrides)
    run_prepare(params.base(), params.config("prepare", PrepareConfig))


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


@cli.command("score-matrix")
@click.option("--sims", "sims_path", required=True, help="[queries, videos] float scores (.npy), higher is better.")
@click.option("--gt", "gt_path", required=True, help="[queries] int ground-truth video column of each query (.npy).")
def score_matrix(sims_path: str, gt_path: str) -> None:
    """Print the PRVR metrics (R1/5/10/100, SumR, MedR, MeanR) of a saved score matrix as one JSON object."""
    from stages.evaluate.metrics import score_matrix_files

    click.echo(json.dumps(score_matrix_files(sims_path, gt_path)))


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


@cli.command("decode", cls=StageCommand, section="decode")
@section_overrides
@click.pass_obj
def decode(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Decode every annotated video once into the zarr frame cache."""
    from stages.data.available import failures_path
    from stages.extract.decode import DecodeConfig, run_decode

    params.use("decode", local_overrides)
    base = params.base()
    summary = run_decode(base, params.config("decode", DecodeConfig))
    failed = f"failed {len(summary.failures)}" + (f" (listed in {failures_path(base)})" if summary.failures else "")
    click.echo(f"decoded {len(summary.decoded)}, already cached {len(summary.skipped)}, {failed}")


# --------------------------------------------------------------------------------------------------------------
# Synthetic dataset and its tiny CLIP
# --------------------------------------------------------------------------------------------------------------


@cli.command("synth", cls=StageCommand, section="synth")
@section_overrides
@click.pass_obj
def synth(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Generate the built-in synthetic PRVR dataset (mp4 videos and TVR-format captions)."""
    from stages.synthetic.synth import SynthConfig, run_synth

    params.use("synth", local_overrides)
    run_synth(params.base(), params.config("synth", SynthConfig))


@cli.command("pretrain-clip", cls=StageCommand, section="pretrain_clip")
@section_overrides
@click.pass_obj
def pretrain_clip(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Train the tiny CLIP of the synthetic dataset on synthetic frames and their descriptions."""
    from stages.synthetic.pretrain_clip import PretrainClipConfig, run_pretrain_clip

    params.use("pretrain_clip", local_overrides)
    run_pretrain_clip(params.base(), params.config("pretrain_clip", PretrainClipConfig))


# --------------------------------------------------------------------------------------------------------------
# ProPy model: official checkpoints
# --------------------------------------------------------------------------------------------------------------


@cli.command("import-checkpoint")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--model", "name", default="propy", show_default=True, help="propy, or a baseline of params.yaml.")
@click.option("--pyramid", type=click.Path(dir_okay=False), help="ProPy: official pyr_configs/*.json (default cfg_32).")
@click.option("--clip-weights", type=click.Path(dir_okay=False), help="ProPy: existing CLIP file to reference.")
@click.option("--clip-out", type=click.Path(dir_okay=False), help="ProPy: CLIP file to write (DST.clip.safetensors).")
@click.pass_obj
def import_checkpoint(
    params: Params, src: str, dst: str, name: str, pyramid: str | None, clip_weights: str | None, clip_out: str | None
) -> None:
    """Convert an official checkpoint into ours; `evaluate MODEL --checkpoint DST` and verify-reference read it.

    ProPy: DST is one file (trainable weights, model config, CLIP sha256 and path). A baseline (`--model msl`): DST
    is a directory (model.safetensors + training.json); its model keys come from params.yaml `baselines.NAME.model`
    (override with -s baselines.NAME.model.KEY=VALUE), its input feature sizes from the checkpoint.
    """
    from stages.models import model_spec

    if model_spec(name).inputs == "frames":
        from stages.models.propy_import import import_official_checkpoint

        written = import_official_checkpoint(src, dst, pyramid, clip_weights=clip_weights, clip_out=clip_out)
    else:
        from stages.models.imported import import_baseline_checkpoint

        if pyramid or clip_weights or clip_out:
            raise PipelineError("--pyramid, --clip-weights and --clip-out are ProPy options")
        written = import_baseline_checkpoint(name, src, dst, _baseline_config(params, name)[0].model)
    click.echo(json.dumps(written, indent=1))


# --------------------------------------------------------------------------------------------------------------
# CLIP features
# --------------------------------------------------------------------------------------------------------------


@cli.command("features", cls=StageCommand, section="features")
@section_overrides
@click.pass_obj
def features(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Extract frozen-CLIP features of every cached frame and query into the HDF5 feature store."""
    from stages.extract.features import FeaturesConfig, run_features

    params.use("features", local_overrides)
    click.echo(f"wrote {run_features(params.base(), params.config('features', FeaturesConfig))}")


# --------------------------------------------------------------------------------------------------------------
# ProPy training and model evaluation
# --------------------------------------------------------------------------------------------------------------


@cli.command("train-propy", cls=StageCommand, section="train_propy")
@section_overrides
@click.pass_obj
def train_propy(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Train ProPy on the frame cache (one process, or every rank under torchrun / SLURM); resumes a killed run."""
    from stages.train.train_propy import TrainPropyConfig, run_train_propy

    params.use("train_propy", local_overrides)
    click.echo(f"checkpoints in {run_train_propy(params.base(), params.config('train_propy', TrainPropyConfig))}")


def _evaluate_propy(params: Params, checkpoint: str | None, metrics: str | None) -> dict[str, Any]:
    from stages.evaluate.evaluator import EvaluateConfig
    from stages.train.train_propy import TrainPropyConfig, run_evaluate_propy

    train, evaluation = params.config("train_propy", TrainPropyConfig), params.config("evaluate", EvaluateConfig)
    return run_evaluate_propy(params.base(), train, evaluation, checkpoint, metrics)


def _baseline_config(params: Params, name: str) -> tuple[Any, Any]:
    """Entry `baselines.NAME` and its typed model config (None for a model without one), keys checked."""
    from stages.models import model_spec
    from stages.train.train_baseline import BaselineStageConfig

    cfg = params.config("baselines", BaselineStageConfig, name)
    spec = model_spec(name)
    if spec.config is None:
        return cfg, None
    return cfg, params.config("baselines", spec.config, f"{name}.model")


def _evaluate_baseline(params: Params, name: str, checkpoint: str | None, metrics: str | None) -> dict[str, Any]:
    from stages.evaluate.evaluator import EvaluateConfig
    from stages.train.train_baseline import run_evaluate_baseline

    evaluation, (entry, _) = params.config("evaluate", EvaluateConfig), _baseline_config(params, name)
    return run_evaluate_baseline(params.base(), name, entry, evaluation, checkpoint, metrics)


@cli.command("evaluate", cls=StageCommand, section="evaluate")
@click.argument("model")
@click.option(
    "--checkpoint",
    type=click.Path(),
    help="Evaluate this model, not the trained one: a ProPy .pt file or a baseline directory (import-checkpoint).",
)
@click.option("--metrics", "metrics_path", help="Metrics file (default metrics/<dataset>/<model>[_<checkpoint>].json).")
@section_overrides
@click.pass_obj
def evaluate(
    params: Params, model: str, checkpoint: str | None, metrics_path: str | None, local_overrides: tuple[str, ...]
) -> None:
    """Evaluate a trained MODEL (propy or any baseline) on the held-out splits: metrics/<dataset>/<model>.json."""
    from stages.models import model_spec

    params.use("evaluate", local_overrides)
    spec = model_spec(model)
    if checkpoint and not metrics_path:  # beside, not over, the trained model's metrics (report shows both)
        metrics_path = str(params.base().dataset_metrics / f"{model}_{Path(checkpoint).stem}.json")
    run = _evaluate_propy if spec.inputs == "frames" else functools.partial(_evaluate_baseline, name=model)
    metrics = run(params, checkpoint=checkpoint, metrics=metrics_path)
    click.echo(json.dumps({k: metrics[k] for k in ("split", "R1", "R5", "R10", "R100", "SumR") if k in metrics}))


# --------------------------------------------------------------------------------------------------------------
# Feature baselines
# --------------------------------------------------------------------------------------------------------------


@cli.command("train-baseline", cls=StageCommand, section="baselines")
@click.argument("name")
@section_overrides
@click.pass_obj
def train_baseline(params: Params, name: str, local_overrides: tuple[str, ...]) -> None:
    """Train the feature baseline NAME (any entry of params.yaml `baselines`) on the CLIP feature store."""
    from stages.train.train_baseline import run_train_baseline

    params.use("baselines", local_overrides)
    click.echo(f"wrote {run_train_baseline(params.base(), name, _baseline_config(params, name)[0])}")


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


@cli.command("report", cls=StageCommand, section="report")
@section_overrides
@click.option(
    "--readme",
    "readme",
    is_flag=False,
    flag_value="README.md",
    default=None,
    metavar="[FILE]",
    help="Also rewrite the summary block of FILE (default README.md) from the new report.",
)
@click.pass_obj
def report(params: Params, local_overrides: tuple[str, ...], readme: str | None) -> None:
    """Write reports/<dataset>.md: every evaluated model beside the papers' numbers for the dataset."""
    from stages.evaluate.evaluator import EvaluateConfig
    from stages.evaluate.report import ReportConfig, run_report

    params.use("report", local_overrides)
    bootstrap = params.config("evaluate", EvaluateConfig).protocol.bootstrap
    cfg = params.config("report", ReportConfig)
    path = run_report(params.base(), cfg, _model_configs(params), bootstrap, Path(readme) if readme else None)
    click.echo(f"wrote {path}" + (f" and the summary of {readme}" if readme else ""))


def _model_configs(params: Params) -> dict[str, Any]:
    """Each model's typed model config from params.yaml (what a report row's configuration is compared with)."""
    from stages.train.train_propy import TrainPropyConfig

    configs: dict[str, Any] = {"propy": params.config("train_propy", TrainPropyConfig).model}
    for name in params.section("baselines")[0]:
        _, model = _baseline_config(params, name)
        if model is not None:
            configs[name] = model
    return configs


# --------------------------------------------------------------------------------------------------------------
# Seeds and figures
# --------------------------------------------------------------------------------------------------------------


@cli.command("seeds")
@click.option("--seeds", "seeds_text", required=True, metavar="N,N,...", help="Training seeds, e.g. 43,44.")
@click.option(
    "--models", "models_text", default="", metavar="NAME,...", help="Models (default: every trainable one in params)."
)
@click.option("--missing-only", is_flag=True, help="Skip the (seed, model) runs whose metrics file exists.")
@click.pass_obj
def seeds(params: Params, seeds_text: str, models_text: str, missing_only: bool) -> None:
    """Re-train and re-evaluate models with other seeds: metrics/<dataset>/seeds/seed<N>/<model>.json."""
    from stages.evaluate.evaluator import EvaluateConfig
    from stages.models import model_spec
    from stages.train.seeds import run_seeds
    from stages.train.train_propy import TrainPropyConfig

    seed_list = _integers(seeds_text, "--seeds")
    baselines = {name: _baseline_config(params, name)[0] for name in params.section("baselines")[0]}
    default = ["propy", *(name for name in baselines if model_spec(name).trainable)]
    models = [m.strip() for m in models_text.split(",") if m.strip()] or default
    propy = params.config("train_propy", TrainPropyConfig)
    evaluation = params.config("evaluate", EvaluateConfig)
    written = run_seeds(params.base(), seed_list, models, propy, baselines, evaluation, missing_only)
    click.echo("\n".join(f"wrote {path}" for path in written) or "nothing to do")


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PipelineError(f"{option} takes comma-separated integers, got {text!r}") from None


@cli.command("figures")
@section_overrides
@click.pass_obj
def figures(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Draw figures/<dataset>/*.png (training curves, efficiency, corpus size, ProPy Figures 4-5, event map)."""
    from stages.evaluate.evaluator import EvaluateConfig
    from stages.evaluate.figures import FiguresConfig, run_figures
    from stages.evaluate.propy_figures import PropyInputs
    from stages.train.train_propy import TrainPropyConfig

    params.use("figures", local_overrides)
    propy = params.config("train_propy", TrainPropyConfig)
    evaluation = params.config("evaluate", EvaluateConfig)
    inputs = PropyInputs(
        split=evaluation.protocol.split,
        max_words=propy.max_words,
        tail_fix=propy.tail_fix,
        amp=propy.amp,
        device=propy.device,
        threads=propy.threads,
        batch_videos=evaluation.batch_videos,
        batch_queries=evaluation.batch_queries,
    )
    written = run_figures(params.base(), params.config("figures", FiguresConfig), inputs)
    click.echo("\n".join(f"wrote {path}" for path in written))


# --------------------------------------------------------------------------------------------------------------
# Search your own videos
# --------------------------------------------------------------------------------------------------------------


def _search_config(params: Params, local_overrides: tuple[str, ...]) -> Any:
    from stages.search.index import SearchConfig

    return params.use("search", local_overrides).config("search", SearchConfig)


@cli.command("index")
@click.argument("video_dir", type=click.Path(file_okay=False))
@click.option("--model", "model_name", default="propy", show_default=True, help="A registered model (propy, msl, ...).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="The index folder.")
@click.option("--checkpoint", help="ProPy checkpoint file or baseline folder (default: where `dvc repro` put it).")
@section_overrides
@click.pass_obj
def index(
    params: Params, video_dir: str, model_name: str, out: str, checkpoint: str | None, local_overrides: tuple[str, ...]
) -> None:
    """Index a folder of videos (recursively) with a trained model; re-runs add, update and remove files."""
    from stages.extract.decode import DecodeConfig
    from stages.models import model_spec
    from stages.search.index import run_index
    from stages.search.models import ModelChoice
    from stages.train.train_propy import TrainPropyConfig

    config = _search_config(params, local_overrides)
    keys = {}
    if model_spec(model_name).inputs == "frames":  # ProPy encodes as it was trained and evaluated
        propy = params.config("train_propy", TrainPropyConfig)
        keys = {"max_words": propy.max_words, "tail_fix": propy.tail_fix, "amp": propy.amp}
    choice = ModelChoice.trained(params.base(), model_name, checkpoint, **keys)
    summary = run_index(Path(video_dir), Path(out), choice, params.config("decode", DecodeConfig), config)
    click.echo(summary.describe())


@cli.command("search")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("query", required=False)
@click.option("--top-k", default=10, show_default=True, help="Videos per query.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of results (logs go to stderr).")
@click.option("--min-score", type=float, help="Leave out videos scoring below this.")
@click.option("--video", "video_glob", help="Only files whose relative path (or id) matches this glob.")
@click.option("--queries", "queries_file", type=click.Path(dir_okay=False), help="One query per line; JSONL out.")
@section_overrides
@click.pass_obj
def search(
    params: Params,
    index_dir: str,
    query: str | None,
    top_k: int,
    as_json: bool,
    min_score: float | None,
    video_glob: str | None,
    queries_file: str | None,
    local_overrides: tuple[str, ...],
) -> None:
    """Search an index in words: each video's best moment (start, end in seconds), its score and thumbnail."""
    from stages.search.search import Searcher, read_query_file

    if (query is None) == (queries_file is None):
        raise PipelineError("give either a QUERY or --queries FILE")
    texts = read_query_file(queries_file) if queries_file else [query]
    results = Searcher(index_dir, _search_config(params, local_overrides)).search(texts, top_k, min_score, video_glob)
    if queries_file:
        for text, hits in zip(texts, results, strict=True):
            click.echo(json.dumps({"query": text, "results": [hit.to_dict() for hit in hits]}))
    elif as_json:
        click.echo(json.dumps([hit.to_dict() for hit in results[0]], indent=1))
    else:
        for hit in results[0]:
            click.echo(f"{hit.rank:>3}  {hit.score:.4f}  {hit.start:8.2f}-{hit.end:<8.2f} {hit.path}")


@cli.command("serve")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--port", default=8765, show_default=True, help="TCP port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@section_overrides
@click.pass_obj
def serve(params: Params, index_dir: str, port: int, host: str, local_overrides: tuple[str, ...]) -> None:
    """Serve a local web page over an index: a search box, result cards and a player that starts at the moment."""
    from stages.search.search import Searcher
    from stages.search.server import serve as serve_index

    serve_index(Searcher(index_dir, _search_config(params, local_overrides)), host, port)


if __name__ == "__main__":
    cli()
