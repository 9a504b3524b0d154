"""Typed configuration: dataclasses built from `params.yaml` sections, and the cache layout."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stages.data.errors import PipelineError

T = TypeVar("T")


@dataclass(frozen=True)
class BaseConfig:
    """The `base` section: what every stage shares (dataset name, seed, where things live)."""

    dataset: str = "synthetic"  # names cache/<dataset>/ and metrics/<dataset>/
    seed: int = 42  # every stage's randomness follows from it
    cache_dir: str = "cache"  # where each dataset's derived data go (frames, features, models)
    metrics_dir: str = "metrics"  # where each dataset's metrics files go
    clip_weights: str = "cache/synthetic/clip_tiny.safetensors"  # the CLIP weights file (safetensors, converted once)
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


def config_from_dict(
    cls: type[T],
    data: dict[str, Any] | None,
    where: str,
    origins: Mapping[str, str] | None = None,
    also_suggest: Iterable[str] = (),
) -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields.

    Unknown keys (with the closest valid key, or name of `also_suggest`, suggested) and values of the wrong type
    raise a PipelineError naming `where` (e.g. `params.yaml:decode`). With `origins` (dotted key of `data` -> where
    its value came from, e.g. `anet.yaml` or `-s lr=1e-3`), `where` is the section's name and the error names the
    file or the override.
    """
    return _build(cls, data, _Where(where, origins or {}, tuple(also_suggest)), "")


@dataclass(frozen=True)
class _Where:
    """Names the place of a key in error messages: `root.key`, prefixed by the file or override it came from."""

    root: str
    origins: Mapping[str, str]
    also_suggest: tuple[str, ...] = ()  # names suggested besides the valid keys (e.g. section names)

    def __call__(self, path: str) -> str:
        key = path.split("[")[0]
        below = (origin for name, origin in self.origins.items() if name.startswith(f"{key}."))
        origin = self.origins.get(key) or next(below, None)
        dotted = f"{self.root}.{path}" if path else self.root
        if origin is None:
            return dotted
        return f"override {origin} ({dotted})" if origin.startswith("-s ") else f"{origin}:{dotted}"


def _build(cls: type[T], data: dict[str, Any] | None, where: _Where, prefix: str) -> T:
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        path = f"{prefix}{unknown[0]}"
        raise PipelineError(
            f"{where(path if where.origins else prefix.rstrip('.'))}: unknown key(s) {unknown}"
            f"{did_you_mean(unknown[0], [*known, *where.also_suggest])}; valid keys are {sorted(known)}"
        )
    kwargs = {name: _coerce(hints[name], value, where, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{where(prefix.rstrip('.'))}: {exc}") from exc


def did_you_mean(key: str, choices: Iterable[str]) -> str:
    """` (did you mean 'lr'?)` when a choice is close to `key`, else an empty string."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(hint: Any, value: Any, where: _Where, path: str) -> Any:
    """Check `value` against a type hint, converting lists to tuples and dicts to nested dataclasses."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where, path)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if errors else f"{where(path)}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise PipelineError(f"{where(path)}: expected a mapping, got {value!r}")
        return _build(hint, value, where, f"{path}.")
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise PipelineError(f"{where(path)}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"{where(path)}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise PipelineError(f"{where(path)}: expected {len(args)} items, got {value!r}")
            return tuple(_coerce(a, v, where, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        return [_coerce(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where(path)}: expected a mapping, got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {_coerce(key_t, k, where, path): _coerce(val_t, v, where, f"{path}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise PipelineError(f"{where(path)}: expected a number, got {value!r}") from None
    if isinstance(hint, type):
        if hint is int and isinstance(value, bool):
            raise PipelineError(f"{where(path)}: expected an integer, got {value!r}")
        if not isinstance(value, hint):
            raise PipelineError(f"{where(path)}: expected {hint.__name__}, got {value!r}")
    return value


REPLACED_WHEN_LAYERED = {"layering": "replace"}  # field metadata: a later params file replaces the mapping whole


def replaced_when_layered(cls: type, path: Sequence[str]) -> bool:
    """Whether the mapping at `path` of a `cls` section is replaced whole by a later params file (its field has
    `metadata=REPLACED_WHEN_LAYERED`) rather than merged key by key."""
    for depth, name in enumerate(path):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if name not in fields:
            return False
        if depth == len(path) - 1:
            return fields[name].metadata.get("layering") == "replace"
        cls = typing.get_type_hints(cls)[name]
    return False


# ------------------------------------------------------------------------------------------------------------------
# What the keys of a config are: for `--help` and `pipeline.py config`
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigField:
    """One field met walking a config instance (`walk_config`)."""

    key: str  # dotted, e.g. "model.pyramid.num_frames"
    name: str  # the field's own name
    value: Any
    owner: type  # the dataclass that declares the field
    depth: int  # 0 for the config's own fields
    nested: bool  # the value is itself a config (its fields follow)


def walk_config(config: Any, prefix: str = "", depth: int = 0) -> Iterator[ConfigField]:
    """Every field of a config instance, depth first: a nested config, then its fields."""
    for f in dataclasses.fields(config):
        if f.init:
            value = getattr(config, f.name)
            nested = dataclasses.is_dataclass(value) and not isinstance(value, type)
            yield ConfigField(f"{prefix}{f.name}", f.name, value, type(config), depth, nested)
            if nested:
                yield from walk_config(value, f"{prefix}{f.name}.", depth + 1)


@dataclass(frozen=True)
class KeyDoc:
    """One key of a config (a leaf; nested dataclasses are walked): its dotted name, default and comment."""

    key: str  # e.g. "model.pyramid.num_frames"
    default: Any
    help: str  # the field's comment in the source, or ""


def describe_config(cls: type) -> list[KeyDoc]:
    """Every key of dataclass `cls` with its default and the comment beside its field in the source."""
    leaves = [field for field in walk_config(cls()) if not field.nested]
    return [KeyDoc(field.key, field.value, field_comments(field.owner).get(field.name, "")) for field in leaves]


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the `# comment` on the line that declares it in the class body (comments read with tokenize)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    readline = io.StringIO(source).readline
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(readline) if tok.type == tokenize.COMMENT}
    found = {}
    for number, line in enumerate(source.splitlines(), start=1):
        declared = _FIELD_LINE.match(line)
        if declared and number in comments and declared.group(1) not in found:
            found[declared.group(1)] = comments[number].lstrip("#").strip()
    return found


_FIELD_LINE = re.compile(r"^    (\w+)\s*:")  # `    name: type = default` in a class body


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config (or mapping) as {dotted key: leaf value}; nested dataclasses and mappings are walked."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}
