"""Procedural scene model of the synthetic dataset: coloured shapes on a textured background, their events, and
rendering to RGB frames.

Coordinates are in *stage* units: the stage is the centred square of side `min(width, height)` (the part that
the decode stage keeps after its short-side resize and centre crop), with (0, 0) its top left corner and (1, 1)
its bottom right. A landscape frame extends the stage to the left and right; what lies there is cropped later.
Sizes are radii in stage units. Everything is a pure function of its arguments; randomness comes in as a numpy
`Generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 95, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 55, 205),
    "orange": (250, 135, 25),
    "cyan": (40, 215, 225),
    "white": (240, 240, 240),
    "pink": (250, 125, 185),
}
SHAPES = ("square", "circle", "triangle", "cross", "ring")
ROTATING_SHAPES = ("square", "triangle", "cross")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((30, 30, 34), (20, 28, 60), (22, 52, 30), (58, 36, 24), (48, 48, 52))
SMALL_SIZE = 0.1
LARGE_SIZE = 0.155
BLINK_HALF_PERIOD = 0.5  # seconds on, then seconds off


@dataclass(frozen=True)
class Background:
    """A dark base colour with a vertical gradient and a fixed noise texture."""

    rgb: tuple[int, int, int]
    gradient: float  # brightness added from top (-gradient/2) to bottom (+gradient/2)
    noise_seed: int
    noise_level: float = 6.0


@dataclass(frozen=True)
class ObjectState:
    """One object between events: what it is, where, how big, and whether it is shown."""

    shape: str
    colour: str
    x: float
    y: float
    size: float
    angle: float = 0.0
    visible: bool = True

    @property
    def size_word(self) -> str:
        """`small`, `large` or empty."""
        if self.size < SMALL_SIZE:
            return "small"
        return "large" if self.size > LARGE_SIZE else ""

    @property
    def place_words(self) -> str:
        """Where it is on the stage: `at the top left`, `on the right`, `in the center`, ..."""
        column = "left" if self.x < 0.36 else "right" if self.x > 0.64 else ""
        row = "top" if self.y < 0.36 else "bottom" if self.y > 0.64 else ""
        if row and column:
            return f"at the {row} {column}"
        if row:
            return f"at the {row}"
        return f"on the {column}" if column else "in the center"

    def noun_phrase(self, article: str = "a", with_size: bool = False) -> str:
        """E.g. `a small red square`."""
        words = [article, self.size_word if with_size else "", self.colour, self.shape]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Sprite:
    """What one object looks like at one instant (the renderer's input)."""

    shape: str
    rgb: tuple[float, float, float]
    x: float
    y: float
    size: float
    angle: float
    opacity: float

    @classmethod
    def of(cls, state: ObjectState) -> Sprite:
        """The sprite of an object at rest."""
        return cls(state.shape, COLOURS[state.colour], state.x, state.y, state.size, state.angle, float(state.visible))


@dataclass(frozen=True)
class Event:
    """Object `actor` changes from `before` to `after` between `start` and `end` seconds by `action`.

    Actions: move (detail = direction), grow, shrink, recolour, blink, spin, jump (detail = height), appear,
    disappear, and drift (the slow whole-video motion of a distractor, never captioned).
    """

    actor: int
    action: str
    start: float
    end: float
    before: ObjectState
    after: ObjectState
    detail: str = ""

    def sprite_at(self, t: float) -> Sprite:
        """The actor's look at time `t` (clamped to the event)."""
        p = min(max((t - self.start) / (self.end - self.start), 0.0), 1.0)
        a, b = self.before, self.after
        smooth = p * p * (3.0 - 2.0 * p)
        x, y = a.x + (b.x - a.x) * smooth, a.y + (b.y - a.y) * smooth
        if self.action == "drift":
            x, y = a.x + (b.x - a.x) * p, a.y + (b.y - a.y) * p
        if self.action == "jump":
            y = a.y - float(self.detail) * math.sin(math.pi * p)
        rgb_a, rgb_b = COLOURS[a.colour], COLOURS[b.colour]
        rgb = tuple(ca + (cb - ca) * smooth for ca, cb in zip(rgb_a, rgb_b, strict=True))
        opacity = {"appear": p, "disappear": 1.0 - p}.get(self.action, float(a.visible))
        if self.action == "blink" and p < 1.0:
            opacity = float(int((t - self.start) / BLINK_HALF_PERIOD) % 2 == 0)
        size = a.size * (b.size / a.size) ** smooth
        angle = a.angle + (b.angle - a.angle) * smooth
        return Sprite(a.shape, rgb, x, y, size, angle, opacity)


def sprite_at(initial: ObjectState, events: list[Event], t: float) -> Sprite:
    """The look at time `t` of an object that starts as `initial` and goes through `events` (in time order)."""
    current = Sprite.of(initial)
    for event in events:
        if event.start > t:
            break
        current = event.sprite_at(t) if t < event.end else Sprite.of(event.after)
    return current


def background_pixels(background: Background, width: int, height: int) -> np.ndarray:
    """The background as float32 [height, width, 3]."""
    rng = np.random.default_rng(background.noise_seed)
    noise = rng.normal(0.0, background.noise_level, size=(height, width, 1)).astype(np.float32)
    ramp = np.linspace(-background.gradient / 2, background.gradient / 2, height, dtype=np.float32)[:, None, None]
    return np.clip(np.asarray(background.rgb, np.float32) + ramp + noise, 0, 255)


def render(background: np.ndarray, sprites: list[Sprite]) -> np.ndarray:
    """Paint sprites (in order, later on top) over a float32 background [H, W, 3]; return uint8 [H, W, 3].

    Edges are anti-aliased by turning each shape's signed distance (in pixels) into a coverage in [0, 1].
    """
    height, width = background.shape[:2]
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    image = background.copy()
    for sprite in sprites:
        if sprite.opacity <= 0.0:
            continue
        cx, cy, radius = left + sprite.x * side, top + sprite.y * side, sprite.size * side
        reach = radius * 1.2 + 2
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        cos, sin = math.cos(sprite.angle), math.sin(sprite.angle)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        coverage = np.clip(0.5 - _signed_distance(sprite.shape, u, v, radius), 0.0, 1.0) * sprite.opacity
        patch = image[y0:y1, x0:x1]
        patch += (np.asarray(sprite.rgb, np.float32) - patch) * coverage[..., None]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance in pixels from a shape centred at the origin (negative inside)."""
    if shape == "circle":
        return np.hypot(u, v) - radius
    if shape == "ring":
        return np.abs(np.hypot(u, v) - radius * 0.72) - radius * 0.28
    if shape == "square":
        return _box(u, v, radius * 0.85, radius * 0.85)
    if shape == "cross":
        return np.minimum(_box(u, v, radius, radius * 0.32), _box(u, v, radius * 0.32, radius))
    if shape == "triangle":  # equilateral, pointing up, circumradius 1.15 * radius
        inradius = radius * 1.15 / 2
        sides = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
        return np.max(np.stack([nx * u + ny * v for nx, ny in sides]), axis=0) - inradius
    raise ValueError(f"unknown shape {shape!r}")


def _box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    qu, qv = np.abs(u) - half_u, np.abs(v) - half_v
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0)


def random_background(rng: np.random.Generator) -> Background:
    """One of the dark base colours with a random gradient and texture."""
    rgb = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Background(rgb=rgb, gradient=float(rng.uniform(-30, 30)), noise_seed=int(rng.integers(2**31)))


def random_object(
    rng: np.random.Generator, taken: set[tuple[str, str]], size_range: tuple[float, float], margin: float = 0.05
) -> ObjectState:
    """A shape/colour pair not in `taken`, placed fully inside the stage."""
    while True:
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        if (shape, colour) not in taken:
            break
    size = float(rng.uniform(*size_range))
    low, high = size + margin, 1.0 - size - margin
    angle = float(rng.uniform(0, 2 * math.pi)) if shape in ROTATING_SHAPES else 0.0
    return ObjectState(shape, colour, float(rng.uniform(low, high)), float(rng.uniform(low, high)), size, angle)


def random_still(
    rng: np.random.Generator, objects: tuple[int, int], size_range: tuple[float, float]
) -> tuple[Background, list[ObjectState]]:
    """A still scene of `objects[0]..objects[1]` distinct shapes (for frame-level CLIP pretraining)."""
    states: list[ObjectState] = []
    for _ in range(rng.integers(objects[0], objects[1] + 1)):
        states.append(random_object(rng, {(s.shape, s.colour) for s in states}, size_range))
    return random_background(rng), states


def describe_still(states: list[ObjectState]) -> str:
    """What one frame shows: `a large red square at the top left and a blue circle in the center`."""
    parts = [f"{s.noun_phrase(with_size=True)} {s.place_words}" for s in states if s.visible]
    if not parts:
        return "an empty background"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
