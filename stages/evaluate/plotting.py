"""Matplotlib on the Agg canvas for every figure: no display, no global pyplot state, atomic PNG writes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def blank_figure(size: tuple[float, float]) -> Figure:
    """An empty figure (inches) with constrained layout, drawn by the Agg canvas."""
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def new_figure(rows: int, columns: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure and its grid of axes as a flat list."""
    figure = blank_figure(size)
    return figure, list(figure.subplots(rows, columns, squeeze=False).flat)


def save(figure: Figure, path: Path, dpi: int) -> Path:
    """Write the figure as PNG atomically and return its path."""
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=dpi)
    tmp.replace(path)
    return path


def model_colours(names: Iterable[str]) -> dict[str, tuple[float, ...]]:
    """One colour per model (sorted names, tab10 then tab20), the same in every figure of a run."""
    palette = [*colormaps["tab10"].colors, *colormaps["tab20"].colors[1::2]]
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(names))}
