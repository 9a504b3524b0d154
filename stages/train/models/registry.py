"""One registry and one factory for every retrieval model (ProPy and the baselines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from stages.data.errors import PipelineError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Register a model constructor under `name` (used as `@register_model("propy")`)."""

    def decorator(fn: F) -> F:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return decorator


def available_models() -> list[str]:
    """Names accepted by `build_model`."""
    return sorted(_MODELS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with keyword arguments for its constructor."""
    if name not in _MODELS:
        raise PipelineError(f"unknown model {name!r}; available: {available_models()}")
    return _MODELS[name](**kwargs)
