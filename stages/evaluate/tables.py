"""Markdown tables for the report: readable headers, values with their interval half-widths, best and runner-up.

A cell is built from a `Value` (a number, optionally with its 95 % interval or a spread) so that the best and the
runner-up of a column can be found, marked (**best**, _runner-up_) and compared: `mark_best` returns the columns in
which the two intervals overlap, which the report prints under the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

LOWER_IS_BETTER = frozenset({"MedR", "MeanR"})
RECALL_HEADERS = {
    "R1": "R@1",
    "R5": "R@5",
    "R10": "R@10",
    "R100": "R@100",
    "SumR": "SumR",
    "MedR": "MedR",
    "MeanR": "MeanR",
}


@dataclass(frozen=True)
class Value:
    """A number in a table cell, with what is printed after it."""

    value: float
    interval: tuple[float, float] | None = None  # 95 % interval: printed as ± half-width, used for overlaps
    spread: float | None = None  # a standard deviation (seeds) or an IQR (timings), printed as ± spread or (IQR)
    spread_style: str = "±"  # "±" or "IQR"
    digits: int = 2
    mark: str = ""  # "best" or "runner-up"

    def render(self) -> str:
        """The cell text, e.g. `11.38 ± 2.85`, `**186.79 ± 7.10**`, `0.25 (IQR 0.02)`."""
        text = _number(self.value, self.digits)
        if self.interval is not None:
            text += f" ± {_number((self.interval[1] - self.interval[0]) / 2, self.digits)}"
        elif self.spread is not None:
            spread = _number(self.spread, self.digits)
            text += f" ± {spread}" if self.spread_style == "±" else f" (IQR {spread})"
        return {"best": f"**{text}**", "runner-up": f"_{text}_"}.get(self.mark, text)


def table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> list[str]:
    """Markdown lines of `rows` under `columns` (row key -> header); missing cells are blank."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(key, "")) for key in columns) + " |")
    return lines


def cell(value: Any) -> str:
    """A cell's text: a Value rendered, floats with 2 decimals (3 significant digits when large), the rest as is."""
    if isinstance(value, Value):
        return value.render()
    if isinstance(value, float):
        return _number(value, 2)
    return str(value)


def mark_best(
    rows: list[dict[str, Any]], keys: Iterable[str], lower_is_better: Iterable[str] = LOWER_IS_BETTER
) -> list[str]:
    """Mark the best and the runner-up Value of each column in place; return the columns whose two intervals overlap."""
    lower = set(lower_is_better)
    overlapping = []
    for key in keys:
        ranked = sorted(
            (i for i, row in enumerate(rows) if isinstance(row.get(key), Value)),
            key=lambda i: rows[i][key].value if key in lower else -rows[i][key].value,
        )
        if len(ranked) < 2:
            continue
        best, runner_up = rows[ranked[0]][key], rows[ranked[1]][key]
        rows[ranked[0]][key] = replace(best, mark="best")
        rows[ranked[1]][key] = replace(runner_up, mark="runner-up")
        if best.interval and runner_up.interval and _overlap(best.interval, runner_up.interval):
            overlapping.append(key)
    return overlapping


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _number(value: float, digits: int) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
