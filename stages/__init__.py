"""PRVR feature-cache pipeline: decode once, extract CLIP features, train ProPy and baselines, evaluate."""

__version__ = "0.1.0"
