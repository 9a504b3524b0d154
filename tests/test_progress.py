"""Progress bars: redrawn on a terminal, a plain line every few seconds in a log; every stage uses the one helper."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from stages.data import progress as progress_module
from stages.data.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_few_whole_lines_not_redraws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.2)
    log = io.StringIO()
    bar = progress_bar(total=60, desc="decode", unit="video", file=log)
    for _ in range(60):  # 1.2 s of updates, each with a postfix refresh (which tqdm draws at once on a terminal)
        time.sleep(0.02)
        bar.update()
        bar.set_postfix(failed=0)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert 3 <= len(lines) <= 9, lines  # about one per 0.2 s and a last one, never one per update
    assert all(line.startswith("decode:") for line in lines) and "60/60" in lines[-1] and "failed=0" in lines[-1]

    quick = io.StringIO()
    for _ in progress_bar(range(1000), desc="scoring", file=quick, leave=False):
        pass
    assert quick.getvalue() == ""  # finished before the first interval: nothing at all


def test_a_terminal_gets_tqdm_redraws() -> None:
    terminal = Terminal()
    for _ in progress_bar(range(3), desc="epoch 1", file=terminal, mininterval=0):
        pass
    assert "\r" in terminal.getvalue() and "epoch 1" in terminal.getvalue()


def test_every_stage_draws_its_progress_with_the_helper() -> None:
    imports = ("from tqdm", "import tqdm")
    users = [p for p in (REPO / "stages").rglob("*.py") if any(i in p.read_text() for i in imports)]
    assert [p.relative_to(REPO).as_posix() for p in users] == ["stages/data/progress.py"]


def test_a_disabled_log_bar_ignores_explicit_refreshes() -> None:
    stream = io.StringIO()
    bar = progress_bar(total=3, desc="quiet", file=stream, disable=True)
    bar.set_postfix(loss=1.0)
    bar.update()
    bar.close()
    assert stream.getvalue() == ""
