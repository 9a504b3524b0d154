"""PRVR baselines on cached CLIP features (MS-SL, GMMFormer), faithful to the official code.

Modules: `preprocessing` (official feature transforms), `data` (datasets and collates), `layers`, `losses`, `base`
(shared config, query encoder, evaluation interface), one file per model, `importer` (official checkpoints),
`reference` (fixture checks, registered for `python pipeline.py verify-reference`).
"""

from stages.train.models.baselines import gmmformer, msl, reference  # noqa: F401 - register models and checks
from stages.train.models.baselines.gmmformer import GMMFormer, GMMFormerConfig
from stages.train.models.baselines.msl import MSSL, MSSLConfig

__all__ = ["GMMFormer", "GMMFormerConfig", "MSSL", "MSSLConfig"]
