"""Official baseline checkpoints made usable and checkable: import into our layout, verify against a fixture.

    python pipeline.py import-checkpoint model_best.ckpt models/msl_tvr --model msl    # -> DIR/model.safetensors
    python pipeline.py evaluate msl --checkpoint models/msl_tvr                        # score it
    python pipeline.py verify-reference msl $PRVR_FIXTURES/baselines_official/mssl_shared --checkpoint DIR

Both work for every feature baseline of the registry with a config dataclass: the official parameter names are ours
(identity mapping), the model keys come from the caller (params.yaml `baselines.<name>.model`), and the input
feature sizes are read off the state dict. ProPy's importer is `propy_import`; its check reads our files itself.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stages.data.config import config_from_dict
from stages.data.errors import PipelineError
from stages.models.baselines.base import BaselineConfig
from stages.models.baselines.importer import import_official, load_official_checkpoint, official_state_dict
from stages.models.reference import reference_check
from stages.models.registry import build_model, model_spec
from stages.models.trained import load_baseline, save_baseline

# Input sizes of a probe model, chosen to equal no other dimension: wherever a probe parameter has one of them, the
# official tensor at that position has the real size.
_PROBE_SIZES = {"visual_input_size": 1031, "query_input_size": 1033}
_WEIGHTS_SUFFIX = "official_state_dict.pt"  # the file of a baseline fixture that holds the official weights


def _baseline_spec(name: str) -> type[BaselineConfig]:
    spec = model_spec(name)
    if spec.inputs != "features" or spec.config is None or not spec.trainable:
        raise PipelineError(f"{name!r} is not a feature baseline with weights (import ProPy without --model)")
    return spec.config


def input_sizes(name: str, keys: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """`visual_input_size` and `query_input_size` of an official state dict of baseline `name` with model `keys`."""
    cls = _baseline_spec(name)
    probe = build_model(name, cfg=config_from_dict(cls, {**keys, **_PROBE_SIZES}, f"baselines.{name}.model"))
    found: dict[str, set[int]] = {field: set() for field in _PROBE_SIZES}
    for key, ours in probe.state_dict().items():
        theirs = state.get(key)
        if theirs is None or theirs.dim() != ours.dim():
            continue
        for our_size, their_size in zip(ours.shape, theirs.shape, strict=True):
            for field, size in _PROBE_SIZES.items():
                if our_size == size:
                    found[field].add(int(their_size))
    ambiguous = {field: sorted(sizes) for field, sizes in found.items() if len(sizes) != 1}
    if ambiguous:
        raise PipelineError(f"cannot read the input feature sizes of {name} off the checkpoint: {ambiguous}")
    return {field: sizes.pop() for field, sizes in found.items()}


def import_baseline_checkpoint(name: str, src: str | Path, dst: str | Path, keys: Mapping[str, Any]) -> dict[str, Any]:
    """Convert an official checkpoint of baseline `name` into `dst/` (model.safetensors + training.json).

    `keys` are the model keys it was trained with (params.yaml `baselines.<name>.model`); the input sizes come from
    the tensors. The official weights must fit that config exactly (strict load). Returns what was written.
    """
    cls = _baseline_spec(name)
    state = official_state_dict(load_official_checkpoint(src))
    config = config_from_dict(cls, {**keys, **input_sizes(name, keys, state)}, f"baselines.{name}.model")
    model = import_official(build_model(name, cfg=config), src, state)
    record = {
        "model": name,
        "trained": True,
        "imported_from": str(src),
        "model_config": dataclasses.asdict(config),
    }
    save_baseline(dst, model.state_dict(), record)
    return {"checkpoint": str(dst), "model": name, **{k: getattr(config, k) for k in _PROBE_SIZES}}


def _fixture_differences(config: BaselineConfig, fixture: BaselineConfig) -> dict[str, tuple[Any, Any]]:
    """Fields of `config` whose value is not the fixture model's (ours, fixture)."""
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(fixture)
    return {key: (value, theirs[key]) for key, value in ours.items() if value != theirs[key]}


def verify_checkpoint(name: str, prefix: str, checkpoint: str | Path) -> dict[str, float]:
    """The fixture check of `name` on one of our model files instead of the fixture's official weights.

    ProPy's check reads our file itself. For a feature baseline, the saved config must agree with the fixture's and
    the unchanged check runs on a copy of the fixture whose official weights are replaced by ours.
    """
    check = reference_check(name)
    if check.reads_checkpoint:
        return check.fn(prefix, checkpoint=str(checkpoint))
    if check.fixture_config is None:
        raise PipelineError(f"the {name!r} check compares no model file; run it without --checkpoint")
    model, config, _ = load_baseline(checkpoint, name)
    config_path = Path(f"{prefix}_config.json")
    if not config_path.is_file():
        raise PipelineError(f"reference fixture files missing: {[str(config_path)]}")
    differ = _fixture_differences(config, check.fixture_config(json.loads(config_path.read_text())))
    if differ:
        raise PipelineError(f"{checkpoint} has another model config than the fixture (ours, fixture): {differ}")
    fixture = Path(prefix)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / fixture.name
        for path in fixture.parent.glob(f"{fixture.name}_*"):
            if not path.name.endswith(_WEIGHTS_SUFFIX):
                (Path(tmp) / path.name).symlink_to(path.resolve())
        torch.save(model.state_dict(), f"{copy}_{_WEIGHTS_SUFFIX}")
        return check.fn(str(copy))
