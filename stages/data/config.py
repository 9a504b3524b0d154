"""Typed configuration: dataclasses built from `params.yaml` sections, and the cache layout."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stages.data.errors import PipelineError

T = TypeVar("T")


@dataclass(frozen=True)
class BaseConfig:
    """The `base` section: what every stage shares (dataset name, seed, where things live)."""

    dataset: str = "synthetic"
    seed: int = 42
    cache_dir: str = "cache"
    metrics_dir: str = "metrics"
    clip_weights: str = "cache/synthetic/clip_tiny.safetensors"
    clip_arch: str = "vit-b-32"  # architecture name of clip_weights (checked on load); names the feature store
    run: str = ""  # a named run (e.g. seeds/seed43): its models and metrics go to <run>/ subfolders; inputs are shared

    def __post_init__(self) -> None:
        if Path(self.run).is_absolute() or ".." in Path(self.run).parts:
            raise PipelineError(f"base.run must be a relative folder name like seeds/seed43, got {self.run!r}")

    @property
    def dataset_cache(self) -> Path:
        """`cache/<dataset>`: every artefact derived from this dataset."""
        return Path(self.cache_dir) / self.dataset

    @property
    def run_cache(self) -> Path:
        """Where this run's trained models live: `cache/<dataset>`, or `cache/<dataset>/<run>` for a named run."""
        return self.dataset_cache / self.run

    @property
    def annotations_path(self) -> Path:
        """Unified annotations written by `prepare` (one JSON object per query)."""
        return self.dataset_cache / "annotations.jsonl"

    @property
    def frames_path(self) -> Path:
        """The zarr v3 frame cache written by `decode`."""
        return self.dataset_cache / "frames.zarr"

    def features_path(self, arch: str | None = None) -> Path:
        """The HDF5 CLIP feature store written by `features` (`clip_<arch>.h5`, default arch `clip_arch`)."""
        return self.dataset_cache / f"clip_{arch or self.clip_arch}.h5"

    @property
    def dataset_metrics(self) -> Path:
        """`metrics/<dataset>`: DVC metrics and plots of every model (`metrics/<dataset>/<run>` for a named run)."""
        return Path(self.metrics_dir) / self.dataset / self.run


def config_from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields.

    Unknown keys and values of the wrong type raise a PipelineError naming `where` (e.g. `params.yaml:decode`).
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{where}: {exc}") from exc


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against a type hint, converting lists to tuples and dicts to nested dataclasses."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise PipelineError(f"{where}: expected a mapping, got {value!r}")
        return config_from_dict(hint, value, where)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise PipelineError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise PipelineError(f"{where}: expected {len(args)} items, got {value!r}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {_coerce(key_t, k, where): _coerce(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise PipelineError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(hint, type):
        if hint is int and isinstance(value, bool):
            raise PipelineError(f"{where}: expected an integer, got {value!r}")
        if not isinstance(value, hint):
            raise PipelineError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
