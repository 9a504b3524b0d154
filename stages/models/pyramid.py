"""ProPy's prompt pyramid: its structure, the event-to-frame windows and the attention masks, from (Nf, H).

Layer 0 is the frames; layer k (1..K) holds n_k events. Adjacent layers are linked by a kernel/stride pair
(c_k, o_k): unit i of layer k covers units [i*o_k, i*o_k + c_k) of layer k-1 (paper Eq. 3-4, Appendix B).
Events are ordered top layer first, left to right, everywhere (prompt tensor, masks, proposals, features).

Two config forms exist, as in the official `pyr_configs/*.json`:
- "H" form: `{"Nf": 32, "H": [[2,2],[2,1],[3,2],[3,2],[3,1]]}` (bottom-up (c_k, o_k)),
- "offset" form: `{"Nf": 32, "offset": [0,1,1,1,1]}` (Nf = 2^p; layer i has segments of 2^i frames with stride
  2^i/2 if offset[i-1] else 2^i; the top layer is one event, so the last entry is never read).
Both describe the paper's default pyramid: 42 events over 32 frames (16, 15, 7, 3, 1 per layer, bottom-up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from stages.data.errors import PipelineError

EventInteraction = Literal["AD", "A", "D", "P", "C", "PC", "W", "S"]
DEFAULT_H = ((2, 2), (2, 1), (3, 2), (3, 2), (3, 1))


@dataclass(frozen=True)
class PyramidConfig:
    """The pyramid hyper-parameters (paper Table 4): the frame count and either H or the offset vector."""

    num_frames: int = 32  # Nf: frames sampled per video (layer 0 of the pyramid)
    kernel_stride: tuple[tuple[int, int], ...] = DEFAULT_H  # H: bottom-up (c_k, o_k); ignored when `offset` is set
    offset: tuple[int, ...] = ()  # the official "offset" form (0/1 per layer, Nf a power of two); () = use H

    @classmethod
    def from_official(cls, pyr_config: dict[str, Any], where: str = "pyr_config") -> PyramidConfig:
        """Parse an official `pyr_configs/*.json` mapping ({"Nf", "H"} or {"Nf", "offset"})."""
        if not isinstance(pyr_config, dict) or "Nf" not in pyr_config or not ({"H", "offset"} & set(pyr_config)):
            raise PipelineError(
                f"{where}: expected {{'Nf': int, 'H': [[c, o], ...]}} or {{'Nf': int, 'offset': [...]}}"
            )
        if "offset" in pyr_config:
            return cls(num_frames=int(pyr_config["Nf"]), offset=tuple(int(v) for v in pyr_config["offset"]))
        pairs = tuple((int(c), int(o)) for c, o in pyr_config["H"])
        return cls(num_frames=int(pyr_config["Nf"]), kernel_stride=pairs)

    def adjacent_pairs(self) -> tuple[tuple[int, int], ...]:
        """The bottom-up (c_k, o_k) of adjacent layers, derived from the offset form when it is used."""
        return _pairs_from_offset(self.num_frames, self.offset) if self.offset else self.kernel_stride


def _pairs_from_offset(num_frames: int, offset: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    power = num_frames.bit_length() - 1
    if num_frames < 2 or 1 << power != num_frames:
        raise PipelineError(f"pyramid offset form needs Nf to be a power of two >= 2, got Nf={num_frames}")
    if len(offset) != power or any(v not in (0, 1) for v in offset):
        raise PipelineError(
            f"pyramid offset form with Nf={num_frames} needs {power} entries of 0 or 1 (one per layer), got {offset}"
        )
    layers = [(0, 1, num_frames)]  # (segment length - 1, stride, events) per layer, frames first
    for level in range(1, power + 1):
        length = 1 << level
        stride = length if length == num_frames or not offset[level - 1] else length // 2
        layers.append((length - 1, stride, (num_frames - length) // stride + 1))
    pairs = []
    for (e_prev, s_prev, m_prev), (e_cur, _, m_cur) in zip(layers, layers[1:], strict=False):
        kernel = (e_cur - e_prev) // s_prev + 1
        pairs.append((kernel, 1 if m_cur == 1 else (m_prev - kernel) // (m_cur - 1)))
    return tuple(pairs)


@dataclass(frozen=True)
class Pyramid:
    """The pyramid built from a config: layer sizes, cross-layer (c, o), event spans and the boolean masks."""

    config: PyramidConfig = field(default_factory=PyramidConfig)

    def __post_init__(self) -> None:
        self.kernel_and_offset  # noqa: B018 - validate eagerly so a bad config fails where it is built

    @cached_property
    def adjacent(self) -> tuple[tuple[int, int], ...]:
        """Bottom-up (c_k, o_k), validated (paper Eq. 4: no padding, exact division)."""
        pairs = self.config.adjacent_pairs()
        if not pairs:
            raise PipelineError("pyramid needs at least one layer of events (H is empty)")
        size = self.config.num_frames
        for level, (kernel, stride) in enumerate(pairs, start=1):
            if kernel < 1 or stride < 1 or kernel > size or (size - kernel) % stride:
                raise PipelineError(
                    f"pyramid layer {level}: (c, o) = ({kernel}, {stride}) does not tile the {size} units of layer "
                    f"{level - 1} (need 1 <= c <= {size} and o dividing {size} - c); fix H or Nf"
                )
            size = (size - kernel) // stride + 1
        return pairs

    @cached_property
    def counts(self) -> tuple[int, ...]:
        """Units per layer, bottom-up: (Nf, n_1, ..., n_K) (the official `cnts`)."""
        sizes = [self.config.num_frames]
        for kernel, stride in self.adjacent:
            sizes.append((sizes[-1] - kernel) // stride + 1)
        return tuple(sizes)

    @property
    def num_levels(self) -> int:
        """K, the number of event layers."""
        return len(self.adjacent)

    @property
    def num_frames(self) -> int:
        """Nf."""
        return self.config.num_frames

    @property
    def num_events(self) -> int:
        """Ne, the number of event prompts."""
        return sum(self.counts[1:])

    @property
    def n1(self) -> int:
        """Events in the bottom layer (the number of visual-prompt copies of C(L1))."""
        return self.counts[1]

    @cached_property
    def kernel_and_offset(self) -> np.ndarray:
        """[K+1, K+1, 2]: (c, o) from layer k1 down to layer k2 < k1; -1 elsewhere (Appendix B, Algorithm 1).

        The official end-aligned rule c = n_k2 - o * (n_k1 - 1) is computed and checked against the receptive-field
        composition c = (c_k1,k2+1 - 1) * o_k2+1,k2 + c_k2+1,k2; they agree whenever every layer tiles its parent.
        """
        levels = self.num_levels + 1
        table = np.full((levels, levels, 2), -1, dtype=np.int32)
        for k, pair in enumerate(self.adjacent, start=1):
            table[k, k - 1] = pair
        for k1 in range(levels - 1, 0, -1):
            for k2 in range(k1 - 2, -1, -1):
                (c_up, o_up), (c_down, o_down) = table[k1, k2 + 1], table[k2 + 1, k2]
                stride = o_up * o_down
                kernel = self.counts[k2] - stride * (self.counts[k1] - 1)
                if kernel != (c_up - 1) * o_down + c_down:
                    raise PipelineError(f"pyramid layers {k1}->{k2}: end-aligned and composed kernels disagree")
                table[k1, k2] = (kernel, stride)
        return table

    @cached_property
    def level_of_event(self) -> np.ndarray:
        """[Ne] pyramid layer (K..1) of each event, top first (the official `layer_of_event`)."""
        return np.repeat(np.arange(self.num_levels, 0, -1), self.counts[:0:-1]).astype(np.int32)

    @cached_property
    def index_in_level(self) -> np.ndarray:
        """[Ne] position of each event within its layer, left to right."""
        return np.concatenate([np.arange(n) for n in self.counts[:0:-1]]).astype(np.int32)

    @cached_property
    def spans(self) -> np.ndarray:
        """[Ne, 2] int32: each event's frames [start, end), top layer first."""
        table = self.kernel_and_offset[self.level_of_event, 0]  # (c, o) of each event's layer to the frames
        start = self.index_in_level * table[:, 1]
        return np.stack([start, start + table[:, 0]], axis=1).astype(np.int32)

    @cached_property
    def proposals(self) -> np.ndarray:
        """[Ne, 2] float32: normalised [start, end) windows, top layer first (moment-retrieval candidates)."""
        return (self.spans / np.float32(self.num_frames)).astype(np.float32)

    @cached_property
    def unit_allowed(self) -> np.ndarray:
        """[Ne+Nf, Ne+Nf] bool: the unified official mask M (True = may attend) over [events top-first; frames].

        Units of one layer see only themselves; units of different layers see each other iff the lower one is
        among the upper one's descendants, 0 <= j2 - o*j1 < c (Appendix B, Eq. 17). Symmetric.
        """
        level = np.concatenate([self.level_of_event, np.zeros(self.num_frames, np.int32)])
        index = np.concatenate([self.index_in_level, np.arange(self.num_frames, dtype=np.int32)])
        upper, lower = np.maximum.outer(level, level), np.minimum.outer(level, level)
        kernel, stride = np.moveaxis(self.kernel_and_offset[upper, lower], -1, 0)
        upper_index = np.where(level[:, None] >= level[None, :], index[:, None], index[None, :])
        lower_index = np.where(level[:, None] >= level[None, :], index[None, :], index[:, None])
        relative = lower_index - stride * upper_index
        descendant = (upper != lower) & (relative >= 0) & (relative < kernel)
        return descendant | ((upper == lower) & (index[:, None] == index[None, :]))

    @property
    def event_event_allowed(self) -> np.ndarray:
        """[Ne, Ne] bool: self, every ancestor and every descendant (span containment either way)."""
        return self.unit_allowed[: self.num_events, : self.num_events]

    @property
    def event_frame_allowed(self) -> np.ndarray:
        """[Ne, Nf] bool: the frames inside each event's span."""
        return self.unit_allowed[: self.num_events, self.num_events :]

    @property
    def event_l1_allowed(self) -> np.ndarray:
        """[Ne, n1] bool: the bottom-layer events inside each event's span (which C(L1) visual-prompt copies)."""
        return self.unit_allowed[: self.num_events, self.num_events - self.n1 : self.num_events]

    def event_interaction(self, area: EventInteraction) -> np.ndarray:
        """[Ne, Ne] bool: which events each event attends to (paper Table 5); self is always included.

        AD = ancestors and descendants (ProPy), A = ancestors, D = descendants, P = parents, C = children,
        PC = parents and children, W = all events (unstructured), S = self only (no interaction).
        """
        level = self.level_of_event
        related = self.event_event_allowed
        above, below = level[None, :] > level[:, None], level[None, :] < level[:, None]
        one_up, one_down = level[None, :] == level[:, None] + 1, level[None, :] == level[:, None] - 1
        relations = {
            "AD": related,
            "A": related & above,
            "D": related & below,
            "P": related & one_up,
            "C": related & one_down,
            "PC": related & (one_up | one_down),
            "W": np.ones_like(related),
            "S": np.zeros_like(related),
        }
        if area not in relations:
            raise PipelineError(f"event interaction must be one of {sorted(relations)}, got {area!r}")
        return relations[area] | np.eye(self.num_events, dtype=bool)

    def official_arrays(self, num_visual_prompts: int, tokens_per_frame: int) -> dict[str, np.ndarray]:
        """Every array of the official structure and masks, named and laid out as in `masks_cfg32.npz`.

        Column layouts of the additive masks (0 allowed, -inf blocked): `attn_gf` p*n1 + j (visual prompt p, copy of
        bottom event j); `attn_gp` t*Nf + f (token t of frame f, token-major); `visual_attn_mask` = [gg | gf | gp].
        """
        ne, n1 = self.num_events, self.n1
        attn_gg = additive_mask(self.event_event_allowed)
        attn_gf = additive_mask(np.tile(self.event_l1_allowed, (1, num_visual_prompts)))
        attn_gp = additive_mask(np.tile(self.event_frame_allowed, (1, tokens_per_frame)))
        return {
            "Nf": np.int32(self.num_frames),
            "Ne": np.int32(ne),
            "n1": np.int32(n1),
            "Nvp": np.int32(num_visual_prompts),
            "visual_token_len": np.int32(tokens_per_frame),
            "H": np.asarray(self.adjacent, dtype=np.int32),
            "cnts": np.asarray(self.counts, dtype=np.int32),
            "level_event_cnts": np.asarray(self.counts[:0:-1], dtype=np.int32),
            "layer_of_event": self.level_of_event,
            "kernel_and_offset": self.kernel_and_offset,
            "proposals": self.proposals,
            "proposals_frames": self.spans,
            "M_full": additive_mask(self.unit_allowed),
            "attn_gg": attn_gg,
            "attn_gf": attn_gf,
            "attn_gp": attn_gp,
            "visual_attn_mask": np.concatenate([attn_gg, attn_gf, attn_gp], axis=1),
            "event_event_allowed": self.event_event_allowed,
            "event_frame_allowed": self.event_frame_allowed,
            "event_l1_allowed": self.event_l1_allowed,
            "vp_column_index": np.arange(num_visual_prompts * n1, dtype=np.int32).reshape(num_visual_prompts, n1),
        }


def additive_mask(allowed: np.ndarray) -> np.ndarray:
    """Boolean mask (True = allowed) to the additive float32 form (0 allowed, -inf blocked)."""
    return np.where(allowed, np.float32(0), np.float32(-np.inf)).astype(np.float32)
