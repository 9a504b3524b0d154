"""Training: models (CLIP backbone, ProPy, baselines), loops, optimisers, checkpoints, distributed helpers."""
