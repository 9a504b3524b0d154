"""Models: the CLIP backbone, ProPy and the PRVR baselines, behind one registry (`build_model`).

This package imports only `stages.data`. `extract`, `train`, `evaluate` and `search` import it.

Adding a method (the registry is the one list of models; nothing else names them):
1. Its file, `stages/models/baselines/<method>.py`: a config dataclass derived from `BaselineConfig` and a model
   derived from `BaselineModel` (or any `nn.Module` with `encode_videos`, `encode_queries` and a `score_fn`),
   registered with `@register_model("<method>", config=<Config>)`. Shared blocks come from `layers`, `losses` and
   `base`; the file adds only what is the method's own. A fixture check goes beside it with
   `@register_reference_check("<method>")`.
2. Its params entry, `baselines.<method>: {model: {...}, train: {...}}` in `params.yaml`: `dvc.yaml` iterates
   over that section, so `train_baseline@<method>` and `evaluate@<method>` exist from then on, and `report`
   gives it a row.
3. Its tests, `tests/test_<method>.py`.
"""

from stages.models import baselines, propy, propy_import  # noqa: F401 - register every model and reference check
from stages.models.registry import ModelSpec, available_models, build_model, model_spec, register_model

__all__ = ["ModelSpec", "available_models", "build_model", "model_spec", "register_model"]
