"""Models: the CLIP backbone, ProPy and the PRVR baselines, behind one registry (`build_model`)."""

from stages.train.models.registry import available_models, build_model, register_model

__all__ = ["available_models", "build_model", "register_model"]
