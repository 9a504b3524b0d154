"""The CLIP feature store: one HDF5 file per dataset and CLIP architecture (`cache/<dataset>/clip_<arch>.h5`).

Layout:
- `/video/<video_id>`: [T, D] projected [CLS] features of the last CLIP layer, one row per cached frame;
- `/text/<query_id>`: [L, D] last-layer token features SOT..EOT (not padded);
- file attributes (`FeatureStoreInfo`): model, weights sha256, open_clip version, layer, normalisation, arch.

Writing (`FeatureStoreWriter`, one writer per file): every entry is written under `/_partial/<kind>/<id>` and then
moved to its final name, so a visible entry is always complete; re-opening skips finished entries and drops partial
ones. An existing file whose attributes differ (other weights, layer, ...) is refused rather than mixed.

Reading (`FeatureStore`): opened lazily on first access and re-opened after a fork, picklable (DataLoader workers
each open their own handle); one entry is read whole per call (never h5py fancy indexing). `store.videos` and
`store.texts` are read-only mappings `id -> np.ndarray`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from stages.data.errors import PipelineError

Kind = Literal["video", "text"]
KINDS: tuple[Kind, ...] = ("video", "text")
_PARTIAL = "_partial"


@dataclass(frozen=True)
class FeatureStoreInfo:
    """What produced the features (stored as file attributes; a store is only ever extended by the same setup)."""

    model: str  # e.g. "ViT-B-32 (OpenAI)"
    weights_sha256: str  # sha256 of the CLIP weights file
    open_clip_version: str
    layer: str  # e.g. "last: ln_post/ln_final + projection"
    normalisation: str  # e.g. "none" (raw projected features) or "l2"
    arch: str  # ClipArch name, e.g. "vit_b32"

    def attrs(self) -> dict[str, str]:
        """The HDF5 attributes."""
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> FeatureStoreInfo:
        """Read back `attrs()`; a missing attribute raises a PipelineError naming `where`."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in attrs]
        if missing:
            raise PipelineError(f"{where} lacks attribute(s) {missing}; it was not written by the feature store")
        return cls(**{name: str(attrs[name]) for name in names})


def _check_id(item_id: str) -> str:
    if not item_id or "/" in item_id or item_id in {".", ".."}:
        raise PipelineError(f"invalid feature id {item_id!r}: ids must be non-empty and contain no '/'")
    return item_id


class FeatureStoreWriter:
    """Single writer of a feature store; resumable (complete entries are kept, partial ones are redone).

    Args:
        path: the HDF5 file (created with its parent folder if missing).
        info: what produces the features; must equal the attributes of an existing file.
        dtype: on-disk dtype of new entries ("float16" halves the size; readers always return float32).
    """

    def __init__(self, path: str | Path, info: FeatureStoreInfo, dtype: str = "float32") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        try:
            # HDF5 1.10 groups (link info, dense link storage): adding an entry costs the same at 100K entries as
            # at 10 (the 1.8 symbol tables grew about 70 % slower per entry over 100K); readable by HDF5 >= 1.10
            self._file = h5py.File(self.path, "a", libver=("v110", "latest"))
        except OSError as exc:
            raise PipelineError(f"cannot open {self.path} for writing ({exc}); delete it if it is corrupt") from exc
        if self._file.attrs:
            existing = FeatureStoreInfo.from_attrs(self._file.attrs, str(self.path))
            if existing != info:
                self._file.close()
                raise PipelineError(
                    f"{self.path} holds features of another setup ({existing}); expected {info}. "
                    "Delete the file (or `dvc remove` its stage output) to re-extract."
                )
        else:
            self._file.attrs.update(info.attrs())
        for kind in KINDS:
            self._file.require_group(kind)
        if _PARTIAL in self._file:
            del self._file[_PARTIAL]  # leftovers of an interrupted run
        self._file.flush()

    def has(self, kind: Kind, item_id: str) -> bool:
        """Whether a complete entry exists."""
        return _check_id(item_id) in self._file[kind]

    def write(self, kind: Kind, item_id: str, features: np.ndarray) -> None:
        """Store one [N, D] entry atomically (written under a temporary name, then moved into place)."""
        features = np.asarray(features)
        if features.ndim != 2 or len(features) == 0 or not np.isfinite(features).all():
            raise PipelineError(f"{kind} features of {item_id!r}: expected a finite non-empty [N, D] array")
        partial = f"{_PARTIAL}/{kind}/{_check_id(item_id)}"
        if partial in self._file:
            del self._file[partial]
        self._file.create_dataset(partial, data=features.astype(self.dtype))
        if item_id in self._file[kind]:
            del self._file[kind][item_id]
        self._file.move(partial, f"{kind}/{item_id}")
        self._file.flush()

    def close(self) -> None:
        """Finish: drop the temporary group and close the file."""
        if self._file.id.valid:
            if _PARTIAL in self._file:
                del self._file[_PARTIAL]
            self._file.close()

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureStore:
    """Lazy, fork-safe, picklable reader of a feature store."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"feature store {self.path} does not exist; run `python pipeline.py features` first")
        self._file: h5py.File | None = None
        self._pid = -1
        self.info = FeatureStoreInfo.from_attrs(self._handle().attrs, str(self.path))
        self.videos = FeatureGroup(self, "video")
        self.texts = FeatureGroup(self, "text")

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise PipelineError(f"cannot read feature store {self.path}: {exc}") from exc
            self._pid = os.getpid()
        return self._file

    def group(self, kind: Kind) -> h5py.Group:
        """The HDF5 group of `kind` (empty groups are fine)."""
        handle = self._handle()
        if kind not in handle:
            raise PipelineError(f"{self.path} has no /{kind} group; it was not written by the feature store")
        return handle[kind]

    def read(self, kind: Kind, item_id: str) -> np.ndarray:
        """One entry as float32 [N, D]; a missing id raises KeyError."""
        group = self.group(kind)
        if item_id not in group:
            raise KeyError(item_id)
        return np.asarray(group[item_id][()], dtype=np.float32)

    def close(self) -> None:
        """Close this process's handle (it re-opens on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, -1
        return state


class FeatureGroup(Mapping[str, np.ndarray]):
    """`id -> float32 array` view of one kind of entry of a `FeatureStore`."""

    def __init__(self, store: FeatureStore, kind: Kind) -> None:
        self.store = store
        self.kind = kind

    def __getitem__(self, item_id: str) -> np.ndarray:
        return self.store.read(self.kind, item_id)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and item_id in self.store.group(self.kind)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.store.group(self.kind).keys()))

    def __len__(self) -> int:
        return len(self.store.group(self.kind))

    def shape(self, item_id: str) -> tuple[int, ...]:
        """The stored shape of one entry, without reading it."""
        return tuple(self.store.group(self.kind)[item_id].shape)
