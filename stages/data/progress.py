"""Progress bars for every stage: a live tqdm bar on a terminal, a plain log line every few seconds elsewhere.

    for batch in progress_bar(loader, desc="encoding videos", unit="batch"):
        ...
    with progress_bar(total=len(jobs), desc="decode", unit="video") as bar:
        bar.update()

Under `dvc exp run`, a queue, CI or `2> log.txt` stderr is not a terminal, and tqdm's carriage-return redraws turn
into megabytes of one line. There the same bar writes one ordinary line (`decode:  40%| 400/1000 [01:02<01:33, ...]`)
at most every `LOG_INTERVAL_S` seconds (none for a bar that finishes sooner), and a last one when a shown bar closes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 10.0  # seconds between two lines of one bar when stderr is not a terminal


class _LineWriter:
    """A text stream for tqdm that turns each redraw into one line of its own and drops line clearing."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A tqdm whose explicit refreshes (`set_postfix`, `set_description`) wait for the interval like updates do."""

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> bool:
        if self.disable:
            return False
        now = self._time()
        if now < self.start_t + self.delay or now - self.last_print_t < self.mininterval:
            return False
        return super().refresh(nolock=nolock, lock_args=lock_args)


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments) that logs plain lines, rarely, when stderr is not a terminal."""
    stream = kwargs.pop("file", None) or sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    interval = kwargs.pop("mininterval", LOG_INTERVAL_S)
    options = {"delay": interval, "mininterval": interval, "maxinterval": max(interval, 10.0), "ascii": True}
    return _LogBar(iterable, file=_LineWriter(stream), ncols=100, **{**options, **kwargs})
