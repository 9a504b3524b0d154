"""PRVR baselines on cached CLIP features: one file per method, the MS-SL family's shared blocks in one place.

Shared modules: `preprocessing` (official feature transforms), `data` (datasets and collates), `layers`, `losses`,
`base` (shared config, query encoder, evaluation interface), `importer` (official state dicts), `reference`
(fixture checks, registered for `python pipeline.py verify-reference`). Every module of this package is imported
here, so a method registers itself (`@register_model`) by being a file of the package.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
