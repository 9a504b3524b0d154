"""One registry and one factory for every retrieval model (ProPy and the baselines).

The registry is the one list of models: the CLI's model names, the baseline configs and the checks that
`params.yaml` and `dvc.yaml` agree with the code all derive from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

from stages.data.errors import PipelineError

Inputs = Literal["frames", "features"]
F = TypeVar("F", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and what it reads."""

    name: str
    build: Callable[..., nn.Module]
    config: type | None  # its config dataclass (None: nothing to configure)
    inputs: Inputs  # "frames": the frame cache (ProPy); "features": the CLIP feature store (the baselines)
    trainable: bool  # False: a reference evaluated as it is (frozen CLIP MIL)


_MODELS: dict[str, ModelSpec] = {}


def register_model(
    name: str, *, config: type | None = None, inputs: Inputs = "features", trainable: bool = True
) -> Callable[[F], F]:
    """Register a model constructor under `name` (used as `@register_model("msl", config=MSSLConfig)`)."""

    def decorator(fn: F) -> F:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelSpec(name, fn, config, inputs, trainable)
        return fn

    return decorator


def available_models(inputs: Inputs | None = None) -> list[str]:
    """Names accepted by `build_model` (only those reading `inputs`, when given)."""
    return sorted(name for name, spec in _MODELS.items() if inputs is None or spec.inputs == inputs)


def model_spec(name: str) -> ModelSpec:
    """The registration of model `name`; a clear error naming the registered models otherwise."""
    if name not in _MODELS:
        raise PipelineError(f"unknown model {name!r}; available: {available_models()}")
    return _MODELS[name]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with keyword arguments for its constructor."""
    return model_spec(name).build(**kwargs)
