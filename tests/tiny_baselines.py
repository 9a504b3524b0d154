"""Tiny configs of every trainable feature baseline, shared by the tests that must cover them all (a test checks
that this table names every registered one)."""

from __future__ import annotations

from typing import Any

TINY_SIZES = {"hidden_size": 8, "n_heads": 2, "max_ctx_l": 10}
NO_DROPOUT = {"input_drop": 0.0, "drop": 0.0}
DYGMM = {"max_desc_l": 6, "map_size": 4, "dygmm_widths": (None, 0.5, 5.0), **NO_DROPOUT}  # w 0.1 needs M > 4
TINY_BASELINES: dict[str, dict[str, Any]] = {
    "msl": {"max_desc_l": 6, "map_size": 4, **NO_DROPOUT},
    "gmmformer": {"max_desc_l": 6, "map_size": 4, **NO_DROPOUT},
    "prototypes": {"max_desc_l": 6, "map_size": 4, "num_prototypes": 3, **NO_DROPOUT},
    "gmmformer2": DYGMM,  # batch-wide QDL and Hungarian clip assignment
    "msc": {**DYGMM, "merge_targets": (6, 4), "adaptive_ranks": ((0.5, 2), (0.3, 3)), "sim_thr": 0.3},  # + RKD
    "amdnet": {"map_size": 4, "event_size": 2, **NO_DROPOUT},  # span diversity and moment relevance per item
    "hlformer": {"max_desc_l": 6, "map_size": 4, "lorentz_dim": 7, "attention_num": 4, **NO_DROPOUT},  # entailment
}


def tiny_keys(name: str) -> dict[str, Any]:
    """`baselines.<name>.model` keys of a tiny `name` (the input sizes come from the features)."""
    return {**TINY_SIZES, **TINY_BASELINES[name]}
