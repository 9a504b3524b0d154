"""The approximate index over a store's units: FAISS IVF-PQ with 4-bit fast-scan codes, inner-product metric.

Built by `index` once the store has `AnnConfig.min_units` units: a coarse quantizer of `lists` centroids (k-means on
a sample of the units), each unit coded in `subquantizers` x 4 bits (32 bytes for 64 subquantizers). A query scans
the `probes` nearest lists and returns its `candidate_units` best units; their videos, in order of their best unit,
are the candidates that `SearchEngine` scores exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from stages.data.errors import PipelineError
from stages.data.progress import progress_bar

ANN_FILE = "ann.faiss"


@dataclass(frozen=True)
class AnnConfig:
    """When and how the approximate index is built and searched."""

    min_units: int = 1_000_000  # build it when the store has at least this many units (exact search below)
    lists: int = 0  # IVF lists; 0 = the power of two nearest sqrt(units), at most max_lists
    max_lists: int = 1024  # coarse assignment costs lists x dim per unit at build time
    subquantizers: int = 64  # PQ subquantizers of 4 bits (32 bytes per unit); a divisor of the unit dimension
    train_units: int = 131072  # units sampled (evenly) to train the quantizers
    probes: int = 32  # lists scanned per query
    candidate_units: int = 8192  # best units returned per query
    candidate_videos: int = 512  # videos (in order of their best unit) re-scored exactly per query
    chunk_units: int = 262144  # units converted to float32 and added at a time

    def __post_init__(self) -> None:
        if min(self.min_units, self.max_lists, self.subquantizers, self.probes, self.chunk_units) < 1:
            raise ValueError("min_units, max_lists, subquantizers, probes and chunk_units must be >= 1")
        if self.candidate_videos < 1 or self.candidate_units < self.candidate_videos:
            raise ValueError("candidate_videos must be >= 1 and candidate_units >= candidate_videos")

    def num_lists(self, num_units: int) -> int:
        """IVF lists for a store of `num_units` units."""
        if self.lists:
            return self.lists
        return int(min(self.max_lists, 2 ** round(math.log2(max(1.0, math.sqrt(num_units))))))


def _faiss() -> ModuleType:
    try:
        import faiss
    except ImportError as exc:
        raise PipelineError("the approximate index needs faiss: pip install faiss-cpu") from exc
    return faiss


def _code_size(dim: int, wanted: int) -> int:
    """The largest even divisor of `dim` that is at most `wanted` (fast-scan packs codes in pairs)."""
    for size in range(min(wanted, dim), 0, -1):
        if dim % size == 0 and size % 2 == 0:
            return size
    raise PipelineError(f"no even number of PQ subquantizers divides the unit dimension {dim}")


def build_ann(units: np.ndarray, config: AnnConfig, path: Path) -> Path:
    """Train and fill the IVF-PQ index over `units` (fp16 [N, D], e.g. memory-mapped) and write it to `path`."""
    faiss = _faiss()
    num_units, dim = units.shape
    lists = config.num_lists(num_units)
    spec = f"IVF{lists},PQ{_code_size(dim, config.subquantizers)}x4fs"
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    sample = max(config.train_units, 40 * lists)
    step = max(1, num_units // sample)
    index.train(np.ascontiguousarray(units[::step][:sample], dtype=np.float32))
    chunks = range(0, num_units, config.chunk_units)
    for start in progress_bar(chunks, desc="approximate index", unit="chunk", leave=False):
        index.add(np.ascontiguousarray(units[start : start + config.chunk_units], dtype=np.float32))
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
    return path


class AnnIndex:
    """A loaded approximate index: candidate videos of queries."""

    def __init__(self, path: Path, config: AnnConfig) -> None:
        faiss = _faiss()
        self.index = faiss.read_index(str(path))
        faiss.extract_index_ivf(self.index).nprobe = config.probes
        self.config = config

    @property
    def nbytes(self) -> int:
        """Bytes of the index in memory (codes, ids and quantizers), as serialised."""
        return int(_faiss().serialize_index(self.index).nbytes)

    def candidates(self, queries: np.ndarray, video_of_units: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
        """Per query [Q, D] (float32, L2-normalised), the videos of its best units, best first, at most
        `candidate_videos`; `video_of_units` maps unit indices to video indices."""
        _, units = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), self.config.candidate_units)
        out = []
        for row in units:
            videos = video_of_units(row[row >= 0])
            _, first = np.unique(videos, return_index=True)
            out.append(videos[np.sort(first)][: self.config.candidate_videos])
        return out
