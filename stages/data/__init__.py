"""Shared data contracts: annotation schema and converters, frame cache and feature store, typed configs."""
