"""Other training seeds: re-train and re-evaluate models on the same dataset, CLIP and features.

    python pipeline.py seeds --seeds 43,44                      # every trainable model of params.yaml
    python pipeline.py seeds --seeds 43,44 --models propy,msl   # some of them
    python pipeline.py seeds --seeds 43 --missing-only          # skip the (seed, model) runs already evaluated
    dvc repro report                                            # the report's seed section gathers them

Seed N trains with `base.seed` = N and writes its models to `cache/<dataset>/seeds/seed<N>/` and its metrics to
`metrics/<dataset>/seeds/seed<N>/<model>.json` (commit those); everything else (annotations, frames, features, the
CLIP and every other setting) is the base run's. The seed runs are not part of the default `dvc repro`, which
stays a single run. One seed of one model by hand, e.g. ProPy on 4 GPUs:

    torchrun --standalone --nproc_per_node=4 pipeline.py -s base.seed=43 -s base.run=seeds/seed43 train-propy
    python pipeline.py -s base.seed=43 -s base.run=seeds/seed43 evaluate propy
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from stages.data.config import BaseConfig
from stages.data.errors import PipelineError
from stages.evaluate.evaluator import EvaluateConfig
from stages.models import model_spec
from stages.train.distributed import log_main
from stages.train.train_baseline import BaselineStageConfig, run_evaluate_baseline, run_train_baseline
from stages.train.train_propy import TrainPropyConfig, run_evaluate_propy, run_train_propy

SEEDS_RUN = "seeds"  # base.run of seed N is seeds/seed<N>


def seed_run(base: BaseConfig, seed: int) -> BaseConfig:
    """The base config of the run with training seed `seed` (its own model and metrics folders)."""
    return dataclasses.replace(base, seed=seed, run=f"{SEEDS_RUN}/seed{seed}")


def run_seeds(
    base: BaseConfig,
    seeds: Sequence[int],
    models: Sequence[str],
    propy: TrainPropyConfig,
    baselines: Mapping[str, BaselineStageConfig],
    evaluation: EvaluateConfig,
    missing_only: bool = False,
) -> list[Path]:
    """Train and evaluate every model of `models` once per seed; return the metrics files written.

    Args:
        base: the base run's `base` section (its seed is the base run's and may not be repeated).
        seeds: training seeds other than `base.seed`.
        models: registered trainable models: `propy` and names of the `baselines` section.
        propy: ProPy's training settings.
        baselines: each baseline's params entry.
        evaluation: the evaluation protocol (the base run's).
        missing_only: skip a (seed, model) pair whose metrics file exists.
    """
    _check(base, seeds, models, baselines)
    written = []
    for seed in seeds:
        run = seed_run(base, seed)
        for name in models:
            path = run.dataset_metrics / f"{name}.json"
            if missing_only and path.is_file():
                log_main(f"seeds: {path} exists; skipped")
                continue
            log_main(f"seeds: training and evaluating {name} with seed {seed}")
            if model_spec(name).inputs == "frames":
                run_train_propy(run, propy)
                run_evaluate_propy(run, propy, evaluation)
            else:
                run_train_baseline(run, name, baselines[name])
                run_evaluate_baseline(run, name, baselines[name], evaluation)
            written.append(path)
    return written


def _check(base: BaseConfig, seeds: Sequence[int], models: Sequence[str], baselines: Mapping[str, object]) -> None:
    if not seeds:
        raise PipelineError("seeds: give at least one seed, e.g. --seeds 43,44")
    if base.seed in seeds or len(set(seeds)) != len(seeds):
        raise PipelineError(f"seeds: {list(seeds)} must be distinct and differ from the base run's seed {base.seed}")
    for name in models:
        spec = model_spec(name)
        if not spec.trainable:
            raise PipelineError(f"seeds: {name} has nothing to train, so every seed gives the same numbers")
        if spec.inputs == "features" and name not in baselines:
            raise PipelineError(f"seeds: {name} has no entry in the params `baselines` section")
