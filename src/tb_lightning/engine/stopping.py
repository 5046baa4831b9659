"""Stops by signal (Ctrl-C = SIGINT, `kill` / SLURM's time limit = SIGTERM) in any phase of a run.

Lightning handles both during `trainer.fit` (SIGTERM at the next batch boundary, Ctrl-C at
once), runs the callbacks' `on_exception` and flushes the loggers, but then exits 0 for
SIGTERM and 1 for Ctrl-C, and outside `fit` (the data scan, feature extraction, the final
scoring) SIGTERM kills the process without a word. Here every phase ends the same way: the
`Stopped` exception reaches the entry point, which prints which phase was stopped and how to
resume, and exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell does.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

from tb_lightning.errors import Stopped

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
__all__ = [
    "SIGNAL_NAMES",
    "Stopped",
    "exit_on_stop",
    "lightning_fit",
    "set_phase",
    "stop_on_signals",
]


class _State:
    phase = "start-up"
    in_fit = False  # Lightning handles the signals itself while it fits
    received: int | None = None  # the last signal received during fit
    main_pid = os.getpid()


def set_phase(phase: str) -> None:
    """Name what the run is doing, for the message when a signal stops it."""
    _State.phase = phase


def current_phase() -> str:
    return _State.phase


def _handle(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _State.main_pid:  # a forked DataLoader worker: just end
        os._exit(128 + signum)
    if _State.in_fit:
        # Lightning's own handler (composed with this one) stops at the next batch boundary;
        # Ctrl-C is Python's KeyboardInterrupt, which Lightning turns into a graceful stop.
        _State.received = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        return
    raise Stopped(signum, _State.phase)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Stopped` (see the module docstring)."""
    _State.main_pid = os.getpid()
    previous = {s: signal.getsignal(s) for s in SIGNAL_NAMES}
    for signum in SIGNAL_NAMES:
        signal.signal(signum, _handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _State.phase, _State.in_fit, _State.received = "start-up", False, None


@contextlib.contextmanager
def lightning_fit() -> Iterator[None]:
    """Around `trainer.fit`: Lightning's stop (SIGTERMException, or its exit after Ctrl-C)
    becomes `Stopped`."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    _State.in_fit, _State.received = True, None
    set_phase("training")
    try:
        yield
    except SIGTERMException:
        raise Stopped(signal.SIGTERM, "training") from None
    except (SystemExit, KeyboardInterrupt):
        if _State.received is not None:  # Lightning exits 1 after a graceful Ctrl-C
            raise Stopped(_State.received, "training") from None
        raise
    finally:
        _State.in_fit = False


@contextlib.contextmanager
def exit_on_stop() -> Iterator[None]:
    """Around a whole command (tb_lightning.train's `cli`): signals are handled from the first
    moment, and a `Stopped` that no task caught (during start-up) prints its sentence and exits
    128 + the signal number. Once the command's work is done, the signals are ignored: what
    remains is the interpreter's exit, and the run has finished."""
    import logging
    import sys

    try:
        with stop_on_signals():
            yield
    except Stopped as stop:
        if logging.getLogger().hasHandlers():  # Hydra's logging is set up
            logging.getLogger("tb_lightning.train").warning("%s", stop)
        else:
            print(stop, file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except SystemExit as done:  # Hydra ends every command with sys.exit
        if not done.code:
            for signum in SIGNAL_NAMES:
                signal.signal(signum, signal.SIG_IGN)
        raise
    for signum in SIGNAL_NAMES:
        signal.signal(signum, signal.SIG_IGN)
