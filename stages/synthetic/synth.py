"""The built-in synthetic PRVR dataset: real H.264 mp4 videos of shape events and TVR-format captions.

    python pipeline.py synth                       # the default dataset (params.yaml `synth` section)
    python pipeline.py synth -s test_videos=20     # a smaller test split
    dvc repro synth

Each video is a sequence of events of different lengths (a shape moves, grows, shrinks, changes colour, blinks,
spins, jumps, appears or disappears) performed one at a time by 2-3 actors, while uncaptioned distractor shapes
drift slowly. Each caption describes one event or a run of 2-3 consecutive events, with exact timestamps, so a
query matches only part of its video, and the same shapes, colours and verbs recur across videos. Everything is
a pure function of the seed. Videos are written to a temporary name and renamed; a re-run skips every video whose
file already holds the same content fingerprint (stored in the mp4 `comment` tag) and removes stale ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np

from stages.data.config import BaseConfig
from stages.data.files import atomic_write_text
from stages.data.progress import progress_bar
from stages.data.video_io import write_video as encode_video
from stages.synthetic.scenes import (
    COLOURS,
    ROTATING_SHAPES,
    Background,
    Event,
    ObjectState,
    background_pixels,
    random_background,
    random_object,
    render,
    sprite_at,
)

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1  # bump when rendering or encoding changes, so that existing videos are regenerated
FINGERPRINT_TAG = "synth-fingerprint:"
MAX_SIZE, MIN_SIZE, MARGIN = 0.23, 0.075, 0.04
VERBS: dict[str, tuple[str, ...]] = {
    "move": ("moves {detail}", "slides {detail}", "travels {detail}"),
    "grow": ("grows", "gets bigger", "expands"),
    "shrink": ("shrinks", "gets smaller"),
    "recolour": ("turns {detail}", "changes colour to {detail}", "becomes {detail}"),
    "blink": ("blinks", "flashes on and off"),
    "spin": ("spins", "rotates"),
    "jump": ("jumps", "bounces up and down"),
    "appear": ("appears", "shows up"),
    "disappear": ("disappears", "vanishes"),
}
CONNECTORS = (", then ", " and then ", ", after that ")


@dataclass(frozen=True)
class SynthConfig:
    """The `synth` section: size, timing and encoding of the synthetic dataset."""

    root: str = "data/synthetic"  # videos/<video_id>.mp4 and annotations/synthetic_<split>.jsonl go here
    seed_offset: int = 0  # added to base.seed
    train_videos: int = 360
    val_videos: int = 60
    test_videos: int = 120
    width: int = 112  # frame size in pixels (even numbers); the centred square of side min(width, height) is
    height: int = 64  # the stage that captions describe (what the decode stage's centre crop keeps)
    fps: int = 6
    min_duration: float = 8.0  # video length in seconds
    max_duration: float = 24.0
    min_event: float = 1.5  # event lengths in seconds (the mean grows with the video, `max_event` is soft)
    max_event: float = 5.0
    min_events: int = 3
    max_events: int = 8
    actors: tuple[int, int] = (2, 3)  # captioned shapes per video (min, max)
    distractors: tuple[int, int] = (1, 2)  # uncaptioned drifting shapes per video (min, max)
    captions: tuple[int, int] = (3, 5)  # captions per video (min, max)
    run_weights: tuple[float, ...] = (0.5, 0.35, 0.15)  # probability that a caption covers 1, 2, 3 events
    place_words: float = 0.5  # probability that a caption names where its subject is (`a red square on the left`)
    crf: int = 20  # libx264 quality
    preset: str = "veryfast"  # libx264 speed preset
    workers: int = 2  # processes encoding videos (1: in this process)

    def __post_init__(self) -> None:
        if self.width % 2 or self.height % 2 or min(self.width, self.height) < 16:
            raise ValueError(f"width and height must be even and >= 16, got {self.width}x{self.height}")
        if not 0 < self.min_duration <= self.max_duration or not 0 < self.min_event <= self.max_event:
            raise ValueError("need 0 < min_duration <= max_duration and 0 < min_event <= max_event")
        if self.min_events * self.min_event > 0.85 * self.min_duration:
            raise ValueError(
                f"{self.min_events} events of at least {self.min_event}s do not fit in {self.min_duration}s videos"
            )
        if not 1 <= self.min_events <= self.max_events or len(self.run_weights) > self.min_events:
            raise ValueError("need 1 <= min_events <= max_events and at most min_events run_weights")
        if not 1 <= self.captions[0] <= self.captions[1] or self.actors[0] < 1 or self.workers < 1:
            raise ValueError("captions, actors and workers must be at least 1 (and min <= max)")

    def videos_in(self, split: str) -> int:
        """How many videos `split` has."""
        return {"train": self.train_videos, "val": self.val_videos, "test": self.test_videos}[split]

    @property
    def videos_dir(self) -> Path:
        """Where the mp4 files go."""
        return Path(self.root) / "videos"

    def annotations_path(self, split: str) -> Path:
        """The TVR-format annotation file of one split."""
        return Path(self.root) / "annotations" / f"synthetic_{split}.jsonl"


@dataclass(frozen=True)
class Caption:
    """A caption of the consecutive events `first..last` (indices into the video's events)."""

    text: str
    first: int
    last: int


@dataclass(frozen=True)
class VideoPlan:
    """Everything needed to render, encode and caption one video."""

    video_id: str
    split: str
    fps: int
    n_frames: int
    width: int
    height: int
    crf: int
    preset: str
    background: Background
    objects: tuple[ObjectState, ...]  # initial states, in drawing order (distractors first)
    events: tuple[Event, ...]  # the captioned events, one at a time, in time order
    ambient: tuple[Event, ...]  # the distractors' drifts (never captioned)
    captions: tuple[Caption, ...]

    @property
    def duration(self) -> float:
        """Seconds: frame count over frame rate."""
        return self.n_frames / self.fps

    def moment(self, caption: Caption) -> tuple[float, float]:
        """Start and end (seconds) of what a caption describes."""
        return self.events[caption.first].start, self.events[caption.last].end

    @property
    def fingerprint(self) -> str:
        """Hash of everything that determines the mp4 bytes (not the captions)."""
        content = dataclasses.asdict(self)
        content.pop("captions")
        content["format"] = (FORMAT_VERSION, av.__version__)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]

    def frames(self) -> np.ndarray:
        """All frames rendered, uint8 [n_frames, height, width, 3]."""
        background = background_pixels(self.background, self.width, self.height)
        timelines = [
            (state, [e for e in (*self.ambient, *self.events) if e.actor == index])
            for index, state in enumerate(self.objects)
        ]
        out = np.empty((self.n_frames, self.height, self.width, 3), np.uint8)
        for index in range(self.n_frames):
            t = index / self.fps
            out[index] = render(background, [sprite_at(state, events, t) for state, events in timelines])
        return out


def plan_dataset(seed: int, cfg: SynthConfig) -> list[VideoPlan]:
    """Plans of every video of every split (each from its own generator, so splits do not depend on each other)."""
    return [
        plan_video(np.random.default_rng([seed, split_index, index]), f"synth_{split}_{index:04d}", split, cfg)
        for split_index, split in enumerate(SPLITS)
        for index in range(cfg.videos_in(split))
    ]


def plan_video(rng: np.random.Generator, video_id: str, split: str, cfg: SynthConfig) -> VideoPlan:
    """Draw one video: background, actors and distractors, the event sequence and the captions."""
    n_frames = int(rng.integers(round(cfg.min_duration * cfg.fps), round(cfg.max_duration * cfg.fps) + 1))
    actors = _place_actors(rng, int(rng.integers(cfg.actors[0], cfg.actors[1] + 1)))
    n_distractors = int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))
    events: list[Event] = []
    states = list(actors)
    for start, end in _event_windows(rng, n_frames, cfg):
        event = _draw_event(rng, states, start / cfg.fps, end / cfg.fps, events[-1] if events else None)
        states[event.actor] = event.after
        events.append(event)
    distractors, ambient = _distractors(rng, n_distractors, actors, cfg, n_frames / cfg.fps)
    shifted = [replace(e, actor=e.actor + n_distractors) for e in events]
    return VideoPlan(
        video_id=video_id,
        split=split,
        fps=cfg.fps,
        n_frames=n_frames,
        width=cfg.width,
        height=cfg.height,
        crf=cfg.crf,
        preset=cfg.preset,
        background=random_background(rng),
        objects=(*distractors, *actors),
        events=tuple(shifted),
        ambient=tuple(ambient),
        captions=_captions(rng, events, cfg),
    )


def _place_actors(rng: np.random.Generator, count: int) -> list[ObjectState]:
    """Distinct shape/colour pairs, spread over the stage; the first is visible, later ones may start hidden."""
    actors: list[ObjectState] = []
    for index in range(count):
        taken = {(a.shape, a.colour) for a in actors}
        for _ in range(50):
            candidate = random_object(rng, taken, (0.09, 0.15), margin=0.08)
            if all(math.dist((candidate.x, candidate.y), (a.x, a.y)) > 0.3 for a in actors):
                break
        actors.append(replace(candidate, visible=index == 0 or bool(rng.random() < 0.75)))
    return actors


def _event_windows(rng: np.random.Generator, n_frames: int, cfg: SynthConfig) -> list[tuple[int, int]]:
    """Start and end frames of consecutive events of random lengths separated by short idle gaps."""
    duration = n_frames / cfg.fps
    low = max(cfg.min_events, math.ceil(0.85 * duration / cfg.max_event))
    high = max(low, min(cfg.max_events, math.floor(0.85 * duration / cfg.min_event)))
    count = int(rng.integers(low, high + 1))
    idle = duration * rng.uniform(0.05, 0.15)
    lengths = cfg.min_event + rng.dirichlet(np.full(count, 1.5)) * (duration - idle - count * cfg.min_event)
    gaps = rng.dirichlet(np.ones(count + 1)) * idle
    windows, t = [], gaps[0]
    for length, gap in zip(lengths, gaps[1:], strict=True):
        start = round(t * cfg.fps)
        end = min(max(start + 1, round((t + length) * cfg.fps)), n_frames)
        windows.append((start, end))
        t += length + gap
    return windows


def _draw_event(
    rng: np.random.Generator, states: list[ObjectState], start: float, end: float, previous: Event | None
) -> Event:
    """Pick a feasible action of one actor (weighted, never the previous event's actor and action) and its outcome."""
    visible = sum(s.visible for s in states)
    options: list[tuple[int, str, str, float]] = []  # actor, action, detail, weight
    for index, s in enumerate(states):
        if not s.visible:
            options.append((index, "appear", "", 1.5))
            continue
        room = {"left": s.x, "right": 1 - s.x, "up": s.y, "down": 1 - s.y}
        options += [(index, "move", d, 0.75) for d, r in room.items() if r - s.size - MARGIN > 0.22]
        options += [(index, "blink", "", 1.0), (index, "recolour", "", 1.0)]
        if s.size * 1.45 <= _largest_size(s):
            options.append((index, "grow", "", 1.0))
        if s.size * 0.7 >= MIN_SIZE:
            options.append((index, "shrink", "", 1.0))
        if s.shape in ROTATING_SHAPES:
            options.append((index, "spin", "", 1.0))
        if s.y - s.size - MARGIN > 0.15:
            options.append((index, "jump", "", 1.0))
        if visible >= 2:
            options.append((index, "disappear", "", 0.7))
    if previous is not None:
        options = [o for o in options if (o[0], o[1]) != (previous.actor, previous.action)]
    weights = np.array([o[3] for o in options])
    actor, action, detail, _ = options[rng.choice(len(options), p=weights / weights.sum())]
    before = states[actor]
    after, detail = _outcome(rng, before, action, detail, states)
    return Event(actor, action, start, end, before, after, detail)


def _outcome(
    rng: np.random.Generator, s: ObjectState, action: str, detail: str, states: list[ObjectState]
) -> tuple[ObjectState, str]:
    """The actor's state after `action`, and the action's detail (direction, colour or jump height)."""
    if action == "move":
        room = {"left": s.x, "right": 1 - s.x, "up": s.y, "down": 1 - s.y}[detail] - s.size - MARGIN
        step = rng.uniform(0.22, min(room, 0.5))
        dx, dy = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[detail]
        return replace(s, x=s.x + dx, y=s.y + dy), detail
    if action == "grow":
        return replace(s, size=s.size * rng.uniform(1.45, min(1.9, _largest_size(s) / s.size))), ""
    if action == "shrink":
        return replace(s, size=s.size * rng.uniform(max(0.5, MIN_SIZE / s.size), 0.7)), ""
    if action == "recolour":
        taken = {(o.shape, o.colour) for o in states}
        colours = [c for c in COLOURS if (s.shape, c) not in taken]
        colour = colours[rng.integers(len(colours))]
        return replace(s, colour=colour), colour
    if action == "spin":
        return replace(s, angle=s.angle + float(rng.choice([-1, 1]) * rng.uniform(0.6, 1.2) * math.pi)), ""
    if action == "jump":
        return s, f"{rng.uniform(0.15, min(0.3, s.y - s.size - MARGIN)):.4f}"
    if action == "appear":
        moved = random_object(rng, set(), (s.size, s.size), margin=0.08)
        return replace(s, x=moved.x, y=moved.y, visible=True), ""
    if action == "disappear":
        return replace(s, visible=False), ""
    return s, ""  # blink


def _largest_size(s: ObjectState) -> float:
    """The largest radius the object can grow to in place and stay inside the stage."""
    return min(MAX_SIZE, s.x - MARGIN / 2, 1 - s.x - MARGIN / 2, s.y - MARGIN / 2, 1 - s.y - MARGIN / 2)


def _distractors(
    rng: np.random.Generator, count: int, actors: list[ObjectState], cfg: SynthConfig, duration: float
) -> tuple[list[ObjectState], list[Event]]:
    """Shapes that drift slowly across the whole frame (margins included) for the whole video."""
    side = min(cfg.width, cfg.height)
    extent = ((cfg.width / side - 1) / 2, (cfg.height / side - 1) / 2)
    taken = {(a.shape, a.colour) for a in actors}
    states, drifts = [], []
    for index in range(count):
        s = random_object(rng, taken, (0.06, 0.12))
        s = replace(s, x=float(rng.uniform(-extent[0] + 0.1, 1 + extent[0] - 0.1)))
        s = replace(s, y=float(rng.uniform(-extent[1] + 0.1, 1 + extent[1] - 0.1)))
        heading, distance = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.2)
        end = replace(s, x=s.x + distance * math.cos(heading), y=s.y + distance * math.sin(heading))
        states.append(s)
        drifts.append(Event(index, "drift", 0.0, duration, s, end))
    return states, drifts


def _captions(rng: np.random.Generator, events: list[Event], cfg: SynthConfig) -> tuple[Caption, ...]:
    """Captions of distinct runs of 1-3 consecutive events, sorted by start."""
    runs = [
        (first, length) for length in range(1, len(cfg.run_weights) + 1) for first in range(len(events) - length + 1)
    ]
    weights = np.array([cfg.run_weights[length - 1] / (len(events) - length + 1) for _, length in runs])
    count = min(int(rng.integers(cfg.captions[0], cfg.captions[1] + 1)), len(runs))
    chosen = rng.choice(len(runs), size=count, replace=False, p=weights / weights.sum())
    picked = sorted(runs[i] for i in chosen)
    return tuple(Caption(_describe(rng, events[f : f + n], cfg.place_words), f, f + n - 1) for f, n in picked)


def _describe(rng: np.random.Generator, run: list[Event], place_probability: float) -> str:
    """`a red square on the left moves up, then grows and then a small blue circle blinks`."""
    clauses = []
    for index, event in enumerate(run):
        verb = VERBS[event.action][rng.integers(len(VERBS[event.action]))].format(detail=event.detail)
        if index and event.actor == run[index - 1].actor:
            clauses.append(verb)
            continue
        article = "the" if any(e.actor == event.actor for e in run[:index]) else "a"
        with_size = bool(event.before.size_word) and rng.random() < 0.3
        subject = event.before.noun_phrase(article, with_size)
        if rng.random() < place_probability:
            subject += " " + (event.after if event.action == "appear" else event.before).place_words
        clauses.append(f"{subject} {verb}")
    text = clauses[0]
    for clause in clauses[1:]:
        text += CONNECTORS[rng.integers(len(CONNECTORS))] + clause
    return text


def write_video(plan: VideoPlan, path: Path) -> None:
    """Render and encode one video, its fingerprint stored in the container's comment."""
    encode_video(
        path, plan.frames(), plan.fps, crf=plan.crf, preset=plan.preset, comment=FINGERPRINT_TAG + plan.fingerprint
    )


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint an existing synthetic mp4 was written with (None if absent or unreadable)."""
    try:
        with av.open(str(path)) as container:
            comment = container.metadata.get("comment", "")
    except (av.error.FFmpegError, OSError):
        return None
    return comment.removeprefix(FINGERPRINT_TAG) if comment.startswith(FINGERPRINT_TAG) else None


def _write_one(job: tuple[VideoPlan, Path]) -> None:
    write_video(*job)


def tvr_lines(plans: list[VideoPlan]) -> list[dict]:
    """TVR-format annotation records (`desc_id`, `desc`, `vid_name`, `duration`, `ts`) of the plans' captions.

    A `desc_id` is `<video_id>_q<k>`: stable when other videos or splits change.
    """
    lines = []
    for plan in plans:
        for number, caption in enumerate(plan.captions):
            start, end = plan.moment(caption)
            lines.append(
                {
                    "desc_id": f"{plan.video_id}_q{number}",
                    "desc": caption.text,
                    "vid_name": plan.video_id,
                    "duration": round(plan.duration, 4),
                    "ts": [round(start, 4), round(end, 4)],
                }
            )
    return lines


def run_synth(base: BaseConfig, cfg: SynthConfig) -> dict[str, int]:
    """Write the synthetic videos and annotations; return counts (videos written, skipped, removed, queries)."""
    started = time.perf_counter()
    plans = plan_dataset(base.seed + cfg.seed_offset, cfg)
    videos_dir = cfg.videos_dir
    videos_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f"{p.video_id}.mp4" for p in plans}
    removed = 0
    for leftover in videos_dir.iterdir():
        if leftover.name.endswith(".part") or (leftover.suffix == ".mp4" and leftover.name not in wanted):
            leftover.unlink()
            removed += leftover.suffix == ".mp4"
    jobs = [
        (plan, path)
        for plan in plans
        if stored_fingerprint(path := videos_dir / f"{plan.video_id}.mp4") != plan.fingerprint
    ]
    progress = progress_bar(total=len(jobs), desc="synth videos", unit="video")
    if cfg.workers == 1 or len(jobs) <= 1:
        for job in jobs:
            _write_one(job)
            progress.update()
    else:
        with ProcessPoolExecutor(cfg.workers) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=4):
                progress.update()
    progress.close()
    queries = 0
    for split in SPLITS:
        records = tvr_lines([p for p in plans if p.split == split])
        atomic_write_text(cfg.annotations_path(split), "".join(json.dumps(r) + "\n" for r in records))
        queries += len(records)
    counts = {"videos": len(plans), "written": len(jobs), "skipped": len(plans) - len(jobs), "removed": removed}
    counts["queries"] = queries
    print(
        f"synth: {counts['videos']} videos ({counts['written']} written, {counts['skipped']} up to date, "
        f"{removed} stale removed), {queries} captions in {time.perf_counter() - started:.1f}s -> {cfg.root}"
    )
    return counts
