"""Stops by signal (Ctrl-C = SIGINT, `kill` / SLURM's time limit = SIGTERM) in any phase of a run.

Lightning handles both during `trainer.fit` (SIGTERM at the next batch boundary, Ctrl-C at
once), runs the callbacks' `on_exception` and flushes the loggers, but then exits 0 for SIGTERM
and 1 for Ctrl-C; and outside `fit` (start-up, the data scan, feature extraction, the final
scoring) SIGTERM used to kill the process without a word. Here every phase ends the same way:
`Stopped` reaches the entry point, which prints the phase and how to resume, and exits 128 +
the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports it.

Outside `fit` the handler only records the signal; the run acts on it at the next safe point
(`raise_if_stopped`: every phase boundary and every batch of the scan, phantom generation,
feature extraction and scoring loops). An exception raised at an arbitrary instruction, in
the middle of a library's bookkeeping, can leave that library broken and the message lost
(seen with OmegaConf). A second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

from tb_lightning.core.errors import Stopped

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class _State:
    phase = "start-up"
    in_fit = False  # Lightning handles the signals itself while it fits
    received: int | None = None  # the signal received, not yet acted upon
    main_pid = os.getpid()


def set_phase(phase: str) -> None:
    """Name what the run does next, for the message when a signal stops it (a safe point)."""
    raise_if_stopped()
    _State.phase = phase


def raise_if_stopped() -> None:
    """A safe point: raise `Stopped` when a signal has arrived since the last one."""
    if _State.received is not None and not _State.in_fit:
        raise Stopped(_State.received, _State.phase)


def _handle(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _State.main_pid:  # a forked DataLoader worker: just end
        os._exit(128 + signum)
    second_interrupt = signum == signal.SIGINT and _State.received == signal.SIGINT
    _State.received = signum
    if _State.in_fit and signum == signal.SIGINT:
        # Python's own Ctrl-C, which Lightning turns into a graceful stop. (SIGTERM: Lightning's
        # handler, composed with this one, stops after the current batch.)
        raise KeyboardInterrupt
    if second_interrupt:
        raise Stopped(signum, _State.phase)


@contextlib.contextmanager
def cancel_pending_on_stop(pool: Any) -> Iterator[None]:
    """Inside `with <executor> as pool`: on a stop, drop the tasks not yet started (an
    executor's exit would otherwise wait for every submitted task, e.g. a whole scan)."""
    try:
        yield
    except Stopped:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def init_worker(worker_id: int) -> None:
    """Every DataLoader's `worker_init_fn`: the worker ignores SIGINT and SIGTERM.

    A stop signal sent to the whole process group (Ctrl-C at a terminal, `kill -- -PGID`,
    SLURM's scancel) reaches the workers too; torch's own SIGTERM handler would end them at
    once, and the main process would then fail wherever it stands (even in the middle of writing
    a checkpoint) instead of stopping at its next safe point. Ignoring it, they keep serving
    batches until the main process shuts them down as it stops (or, should it die, until torch's
    watchdog sees their parent gone). Lightning's seeding of the workers, which it adds only to
    a DataLoader without a worker_init_fn, is done here as Lightning would
    (`seed_everything(workers=True)` sets PL_SEED_WORKERS).
    """
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
    for signum in SIGNAL_NAMES:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def workers_end_with_the_run() -> Iterator[None]:
    """Around a loop over a DataLoader, the fallback to `init_worker`: when a worker dies anyway
    while a stop signal is pending (killed outright, or a DataLoader built without init_worker),
    torch raises a RuntimeError ("DataLoader worker ... is killed by signal") before the run
    reaches a safe point; that error is the stop (`Stopped`), not a crash. Without a signal it
    stays an error."""
    try:
        yield
    except RuntimeError as exc:
        if _State.received is not None and "DataLoader worker" in str(exc):
            raise Stopped(_State.received, _State.phase) from None
        raise


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the run at the next safe point."""
    _State.main_pid = os.getpid()
    previous = {s: signal.getsignal(s) for s in SIGNAL_NAMES}
    for signum in SIGNAL_NAMES:
        signal.signal(signum, _handle)
    try:
        yield  # a signal after the block's work is done is not acted upon: the work is done
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _State.phase, _State.in_fit, _State.received = "start-up", False, None


@contextlib.contextmanager
def lightning_fit() -> Iterator[None]:
    """Around `trainer.fit`: Lightning's stop (SIGTERMException, or its exit after Ctrl-C)
    becomes `Stopped`."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    set_phase("training")
    _State.in_fit = True
    try:
        with workers_end_with_the_run():
            yield
    except SIGTERMException:
        raise Stopped(signal.SIGTERM, "training") from None
    except (SystemExit, KeyboardInterrupt):
        if _State.received is not None:  # Lightning exits 1 after a graceful Ctrl-C
            raise Stopped(_State.received, "training") from None
        raise
    finally:
        _State.in_fit = False
    raise_if_stopped()


@contextlib.contextmanager
def exit_on_stop() -> Iterator[None]:
    """Around a whole command (tb_lightning.train's `cli`): signals are handled from the first
    moment, and a `Stopped` that no task caught prints its sentence and exits 128 + the signal
    number. Once the command's work is done the signals are ignored: what remains is the
    interpreter's exit, and the run has finished."""
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
            _ignore_signals()
        raise
    _ignore_signals()


def _ignore_signals() -> None:
    for signum in SIGNAL_NAMES:
        signal.signal(signum, signal.SIG_IGN)
