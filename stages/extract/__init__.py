"""Extraction: the synthetic dataset, decoding videos into the frame cache, CLIP feature extraction."""
