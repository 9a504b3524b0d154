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
def verify_reference(model: str, prefix: str) -> None:
    """Compare our port with an official-code fixture (PREFIX_*); exit 0 iff every error is at most 1e-4."""
    import stages.models  # noqa: F401 - model modules register their reference checks
    from stages.models.reference import TOLERANCE, run_reference_check

    errors = run_reference_check(model, prefix)
    click.echo(json.dumps(errors, indent=1))
    if not errors or max(errors.values()) > TOLERANCE:
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
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--pyramid", type=click.Path(dir_okay=False), help="Official pyr_configs/*.json (default: cfg_32).")
@click.option("--clip-weights", type=click.Path(dir_okay=False), help="Existing CLIP file to reference (checked).")
@click.option("--clip-out", type=click.Path(dir_okay=False), help="Output CLIP file (default: DST.clip.safetensors).")
def import_checkpoint(src: str, dst: str, pyramid: str | None, clip_weights: str | None, clip_out: str | None) -> None:
    """Convert an official ProPy checkpoint into ours (trainable weights, model config, CLIP sha256)."""
    from stages.models.propy_import import import_official_checkpoint

    written = import_official_checkpoint(src, dst, pyramid, clip_weights=clip_weights, clip_out=clip_out)
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


def _evaluate_propy(params: Params) -> dict[str, Any]:
    from stages.evaluate.evaluator import EvaluateConfig
    from stages.train.train_propy import TrainPropyConfig, run_evaluate_propy

    return run_evaluate_propy(
        params.base(), params.config("train_propy", TrainPropyConfig), params.config("evaluate", EvaluateConfig)
    )


def _baseline_config(params: Params, name: str) -> Any:
    from stages.data.config import config_from_dict
    from stages.train.train_baseline import BaselineStageConfig

    section = params.section("baselines")
    if name not in section:
        raise PipelineError(f"{params.path} has no `baselines.{name}` entry; baselines there: {sorted(section)}")
    return config_from_dict(BaselineStageConfig, section[name], f"{params.path}:baselines.{name}")


def _evaluate_baseline(params: Params, name: str) -> dict[str, Any]:
    from stages.evaluate.evaluator import EvaluateConfig
    from stages.train.train_baseline import run_evaluate_baseline

    evaluation = params.config("evaluate", EvaluateConfig)
    return run_evaluate_baseline(params.base(), name, _baseline_config(params, name), evaluation)


@cli.command("evaluate")
@click.argument("model")
@section_overrides
@click.pass_obj
def evaluate(params: Params, model: str, local_overrides: tuple[str, ...]) -> None:
    """Evaluate a trained MODEL (propy or any baseline) on the held-out splits: metrics/<dataset>/<model>.json."""
    from stages.models import model_spec

    params.use("evaluate", local_overrides)
    spec = model_spec(model)
    metrics = _evaluate_propy(params) if spec.inputs == "frames" else _evaluate_baseline(params, model)
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
@click.pass_obj
def report(params: Params, local_overrides: tuple[str, ...]) -> None:
    """Write reports/<dataset>.md: every evaluated model beside the papers' numbers for the dataset."""
    from stages.evaluate.report import ReportConfig, run_report

    params.use("report", local_overrides)
    click.echo(f"wrote {run_report(params.base(), params.config('report', ReportConfig))}")


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

    config = _search_config(params, local_overrides)
    propy = params.section("train_propy")
    keys = {k: propy[k] for k in ("max_words", "tail_fix", "amp") if k in propy}
    if model_spec(model_name).inputs == "features":
        keys = {"model_keys": (params.section("baselines").get(model_name) or {}).get("model", {})}
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
