"""Evaluation: PRVR and moment metrics, chunked similarity, efficiency probes, reports."""
