"""Models: the CLIP backbone, ProPy and the PRVR baselines, behind one registry (`build_model`)."""

from stages.train.models import propy_import  # noqa: F401 - registers "propy" and its reference check
from stages.train.models.baselines import (  # noqa: F401 - register their models and reference checks
    clip_mil,
    gmmformer,
    msl,
    prototypes,
)
from stages.train.models.registry import available_models, build_model, register_model

__all__ = ["available_models", "build_model", "register_model"]
