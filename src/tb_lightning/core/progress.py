"""Progress that can be followed anywhere: a bar at a terminal, plain log lines everywhere else.

A bar redraws itself with carriage returns; written into a file (`make train > log`, nohup, SLURM,
CI) it becomes hundreds of `\\r` frames, or, for rich, one frame at the very end. Away from a
terminal every long loop therefore logs a plain line instead, through the logging system, so the
same line reaches stdout and the run's log file (`train.log`): at every 10 % step, and at least
every 30 s (a heartbeat for slow steps), never more than one a second. Loops shorter than a second
log nothing (the caller's own summary line says what was done). The training epochs have their
own line (engine/callbacks.py EpochProgressLog).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

log = logging.getLogger(__name__)

# A line at each of these fractions of the work (10 %, 20 %, ...) ...
STEP_FRACTION = 0.1
# ... and one at least this often, however slowly the steps come ...
HEARTBEAT_SECONDS = 30.0
# ... but never two within this time: a fast loop says nothing, or only that it finished.
MIN_SECONDS = 1.0


def interactive() -> bool:
    """True when stdout and stderr are both terminals: bars are drawn (rich's and Lightning's
    bars write to stdout, the log to stderr); otherwise plain lines are logged, so that no `\\r`
    frame reaches a file whichever of the two is redirected."""
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`: how long, at the precision a person reads."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress(Protocol):
    """What a loop calls, whatever draws or logs its progress."""

    def update(self, n: int = 1) -> Any: ...

    def reset(self, total: int | None = None) -> Any: ...


class ProgressLog:
    """Logs `<description>: done/total (pct), elapsed, ETA` lines at the pace set above.

    `clock` is injectable for tests; `logger` is where the lines go (the caller's module logger,
    so the line names the part of the program doing the work).
    """

    def __init__(
        self,
        description: str,
        total: int,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.logger = logger or log
        self.clock = clock
        self.reset(total)

    def reset(self, total: int | None = None) -> None:
        """Start counting again (from 0, over `total` when given)."""
        if total is not None:
            self.total = max(0, int(total))
        self.done = 0
        self.start = self.last_line = self.clock()
        self.last_step = 0  # the last 10 % step a line was logged for

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        since_line, elapsed = now - self.last_line, now - self.start
        step = self._step()
        finished = self.total > 0 and self.done >= self.total
        if finished:  # once, at the end of a loop that was worth following
            due = elapsed >= MIN_SECONDS and step > self.last_step
        else:
            due = since_line >= MIN_SECONDS and (
                step > self.last_step or since_line >= HEARTBEAT_SECONDS
            )
        if due:
            self.logger.info("%s", self.line(elapsed))
            self.last_line, self.last_step = now, step

    def _step(self) -> int:
        if self.total <= 0:
            return 0
        return int(min(self.done, self.total) / self.total / STEP_FRACTION + 1e-9)

    def line(self, elapsed: float) -> str:
        """`Checking images: 1200/5000 (24%), 31 s, ETA 1 min 38 s`."""
        if self.total <= 0:
            return f"{self.description}: {self.done}, {format_duration(elapsed)}"
        text = f"{self.description}: {self.done}/{self.total} ({self.done / self.total:.0%})"
        if self.done >= self.total:
            return f"{text}, done in {format_duration(elapsed)}"
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        eta_text = f", ETA {format_duration(eta)}" if eta is not None else ""
        return f"{text}, {format_duration(elapsed)}{eta_text}"


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass


class _RichBar:
    """rich's bar behind the `Progress` calls (inference passes, image cache, Grad-CAM)."""

    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def update(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)

    def reset(self, total: int | None = None) -> None:
        self.bar.reset(self.task, total=total)


@contextmanager
def report_progress(
    description: str,
    total: int,
    *,
    enabled: bool = True,
    logger: logging.Logger | None = None,
) -> Iterator[Progress]:
    """The progress of a loop of `total` steps: call `.update(n)` as they are done.

    At a terminal a rich bar (rich draws Lightning's bar too: one progress-bar library),
    elsewhere a ProgressLog; nothing when not `enabled`.
    """
    if not enabled:
        yield _NoProgress()
    elif not interactive():
        yield ProgressLog(description, total, logger=logger)
    else:
        from rich.progress import Progress as RichProgress

        with RichProgress(transient=False) as rich_bar:
            yield _RichBar(rich_bar, rich_bar.add_task(description, total=total))
