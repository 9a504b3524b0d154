"""Reference checks: run our port on a fixture of the official code and report the maximum absolute errors.

A fixture is named by a PREFIX (e.g. `.../propy_official/cfg32`); each model family registers one check that reads
`PREFIX_*` files, runs our model and returns {output name: max abs error}.
"""

from __future__ import annotations

from collections.abc import Callable

from stages.data.errors import PipelineError

TOLERANCE = 1e-4
ReferenceCheck = Callable[[str], dict[str, float]]
_CHECKS: dict[str, ReferenceCheck] = {}


def register_reference_check(name: str) -> Callable[[ReferenceCheck], ReferenceCheck]:
    """Register the fixture check of one model family (`@register_reference_check("propy")`)."""

    def decorator(fn: ReferenceCheck) -> ReferenceCheck:
        _CHECKS[name] = fn
        return fn

    return decorator


def reference_check_names() -> list[str]:
    """Model families that have a fixture check."""
    return sorted(_CHECKS)


def run_reference_check(name: str, prefix: str) -> dict[str, float]:
    """Run the check of model family `name` on the fixture `prefix`."""
    if name not in _CHECKS:
        raise PipelineError(f"no reference check for {name!r}; available: {reference_check_names()}")
    return _CHECKS[name](prefix)
