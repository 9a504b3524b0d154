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

import copy
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
        merged = copy.deepcopy(self.data.get(name) or {})
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


@cli.command("prepare")
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


@cli.command("decode")
@section_overrides
@click.pass_obj
def decode(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Decode every annotated video once into the zarr frame cache."""
    from stages.extract.decode import DecodeConfig, run_decode

    params.use("decode", local_overrides)
    summary = run_decode(params.base(), params.config("decode", DecodeConfig))
    click.echo(f"decoded {len(summary.decoded)}, already cached {len(summary.skipped)}, failed {len(summary.failures)}")


# --------------------------------------------------------------------------------------------------------------
# Synthetic dataset and its tiny CLIP
# --------------------------------------------------------------------------------------------------------------


@cli.command("synth")
@section_overrides
@click.pass_obj
def synth(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Generate the built-in synthetic PRVR dataset (mp4 videos and TVR-format captions)."""
    from stages.synthetic.synth import SynthConfig, run_synth

    params.use("synth", local_overrides)
    run_synth(params.base(), params.config("synth", SynthConfig))


@cli.command("pretrain-clip")
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
        written = import_baseline_checkpoint(name, src, dst, _baseline_config(params, name).model)
    click.echo(json.dumps(written, indent=1))


# --------------------------------------------------------------------------------------------------------------
# CLIP features
# --------------------------------------------------------------------------------------------------------------


@cli.command("features")
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


@cli.command("train-propy")
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


def _baseline_config(params: Params, name: str) -> Any:
    from stages.data.config import config_from_dict
    from stages.train.train_baseline import BaselineStageConfig

    section = params.section("baselines")
    if name not in section:
        raise PipelineError(f"{params.path} has no `baselines.{name}` entry; baselines there: {sorted(section)}")
    return config_from_dict(BaselineStageConfig, section[name], f"{params.path}:baselines.{name}")


def _evaluate_baseline(params: Params, name: str, checkpoint: str | None, metrics: str | None) -> dict[str, Any]:
    from stages.evaluate.evaluator import EvaluateConfig
    from stages.train.train_baseline import run_evaluate_baseline

    evaluation = params.config("evaluate", EvaluateConfig)
    return run_evaluate_baseline(params.base(), name, _baseline_config(params, name), evaluation, checkpoint, metrics)


@cli.command("evaluate")
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


@cli.command("train-baseline")
@click.argument("name")
@section_overrides
@click.pass_obj
def train_baseline(params: Params, name: str, local_overrides: tuple[str, ...]) -> None:
    """Train the feature baseline NAME (any entry of params.yaml `baselines`) on the CLIP feature store."""
    from stages.train.train_baseline import run_train_baseline

    params.use("baselines", local_overrides)
    click.echo(f"wrote {run_train_baseline(params.base(), name, _baseline_config(params, name))}")


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


@cli.command("report")
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
    from stages.data.config import config_from_dict
    from stages.models import model_spec
    from stages.train.train_propy import TrainPropyConfig

    configs: dict[str, Any] = {"propy": params.config("train_propy", TrainPropyConfig).model}
    for name, entry in params.section("baselines").items():
        spec = model_spec(name)
        if spec.config is not None:
            model = (entry or {}).get("model", {})
            configs[name] = config_from_dict(spec.config, model, f"{params.path}:baselines.{name}.model")
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
    baselines = {name: _baseline_config(params, name) for name in params.section("baselines")}
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


if __name__ == "__main__":
    cli()
