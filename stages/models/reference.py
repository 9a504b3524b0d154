"""Reference checks: run our port on a fixture of the official code and report the maximum errors.

A fixture is named by a PREFIX (e.g. `.../propy_official/cfg32`); each model family registers one check that reads
`PREFIX_*` files, runs our model and returns {output name: error}. A check passes when every error is at most its
tolerance (1e-4 absolute unless registered otherwise). A check registered with `reads_checkpoint=True` also takes
`checkpoint=PATH`, one of our model files to check against the fixture instead of the official weights
(`stages.models.trained.verify_checkpoint` does this for every feature baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.data.errors import PipelineError

TOLERANCE = 1e-4
CheckFn = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class ReferenceCheck:
    """A registered fixture check."""

    fn: CheckFn  # PREFIX (and `checkpoint=` when `reads_checkpoint`) -> {output name: error}
    tolerance: float  # the largest error that passes
    reads_checkpoint: bool  # True: `fn` also checks one of our model files given as `checkpoint=PATH`
    fixture_config: Callable[[dict[str, Any]], Any] | None  # a fixture's config.json -> the model config it checks


_CHECKS: dict[str, ReferenceCheck] = {}


def register_reference_check(
    name: str,
    *,
    tolerance: float = TOLERANCE,
    reads_checkpoint: bool = False,
    fixture_config: Callable[[dict[str, Any]], Any] | None = None,
) -> Callable[[CheckFn], CheckFn]:
    """Register the fixture check of one model family (`@register_reference_check("propy")`); a feature baseline's
    check gives `fixture_config`, the model config it builds from a fixture, which one of our model files must have."""

    def decorator(fn: CheckFn) -> CheckFn:
        _CHECKS[name] = ReferenceCheck(fn, tolerance, reads_checkpoint, fixture_config)
        return fn

    return decorator


def reference_check_names() -> list[str]:
    """Model families that have a fixture check."""
    return sorted(_CHECKS)


def reference_check(name: str) -> ReferenceCheck:
    """The registered check of model family `name`; a clear error naming the available ones otherwise."""
    if name not in _CHECKS:
        raise PipelineError(f"no reference check for {name!r}; available: {reference_check_names()}")
    return _CHECKS[name]


def run_reference_check(name: str, prefix: str, **kwargs: Any) -> dict[str, float]:
    """Run the check of model family `name` on the fixture `prefix`."""
    return reference_check(name).fn(prefix, **kwargs)
