"""Import official MS-SL / GMMFormer (v1, v2) / MSC checkpoints.

Our modules use the official parameter names, so the key mapping is the identity: an official `state_dict` loads with
`strict=True` once its container and an optional DataParallel `module.` prefix are removed.
- MS-SL saves `{"model": state_dict, "model_cfg": EasyDict, "epoch": int}`;
- GMMFormer, GMMFormer v2 and MSC save `{"config": dict, "epoch", "model_val", "state_dict", "optimizer"}`.
The EasyDict config cannot be read with `weights_only=True`; the loader below unpickles it as a plain dict with a
restricted unpickler that admits only tensors, containers and that one class.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import torch

from stages.data.errors import PipelineError

_CONTAINER_KEYS = ("model", "state_dict")
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool", "bytes", "object", "slice"}


class _ConfigDict(dict):
    """Stand-in for `easydict.EasyDict` (a dict whose attributes mirror its keys)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for checkpoint containers: tensors, plain containers and EasyDict configs only."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module == "torch._utils" and name.startswith("_rebuild"))
            or (
                module == "torch"
                and (name.endswith("Storage") or name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))
            )
            or (module == "torch.storage" and name == "UntypedStorage")
            or (module == "collections" and name == "OrderedDict")
            or (module == "copyreg" and name == "_reconstructor")
            or (module == "builtins" and name in _BUILTINS)
        )
        if module == "easydict" and name == "EasyDict":
            return _ConfigDict
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")
        return super().find_class(module, name)


_RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler, load=pickle.load, __name__="restricted_pickle"
)


def load_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an official checkpoint file (any of the containers above, or a bare state dict) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise PipelineError(f"{path} is not a readable MS-SL/GMMFormer checkpoint: {exc}") from exc


def official_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict inside an official checkpoint container, without any DataParallel `module.` prefix."""
    state = next((checkpoint[key] for key in _CONTAINER_KEYS if isinstance(checkpoint.get(key), dict)), checkpoint)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"no model state dict found in the checkpoint (keys: {sorted(checkpoint)[:10]})")
    return {key.removeprefix("module."): value for key, value in state.items()}


def import_official(
    model: torch.nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """Load an official checkpoint into our `model` (identity key mapping, strict); `state`: its
    `official_state_dict`, when the caller has read it already."""
    state = official_state_dict(load_official_checkpoint(path)) if state is None else state
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PipelineError(f"{path} does not fit {type(model).__name__} with its config: {exc}") from exc
    return model
