"""`python -m <module> <overrides>` in a fork of the test process: the command as a user runs it
(its own process, exit code, stdout and stderr, Hydra's main, run folders, logging and atexit
handlers), without a fresh interpreter's ~7 s of imports (torch, Lightning, torchmetrics),
which the fork inherits already done.

What differs from a fresh `python -m`: the modules are those this process imported (and any
state they hold), and PYTHONPATH is not read again (this process's sys.path already holds src/
and tests/). Used by the default suite's end-to-end runs of train, eval, predict and export;
the fail-fast tests, which check that torch is not imported, and the slow tests keep fresh
interpreters (conftest.run_cli). TB_LIGHTNING_TESTS_COLD_CLI=1 makes every run a fresh one.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# What a fork's first backward() raises once the parent's autograd engine has started its
# threads (conftest.run_cli reruns such a command cold).
AUTOGRAD_FORK_ERROR = "Unable to handle autograd's threading in combination with fork"


def run_in_fork(
    module: str, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `module` as __main__ with `args` in a child of this process; its result as
    subprocess.run(capture_output=True, text=True) gives it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the test process's code
            code = 1
            try:
                code = _child(module, args, env, cwd, out.fileno(), err.fileno())
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired([module, *args], timeout)
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            [sys.executable, "-m", module, *args],
            os.waitstatus_to_exitcode(status),
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def _child(module: str, args: list[str], env: dict[str, str], cwd: Path, out: int, err: int) -> int:
    """What a fresh `python -m module args` would start with, then the module as __main__."""
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
    sys.stdin = open(os.devnull)  # noqa: SIM115 (the process's stdin, for its whole life)
    # The test process's exit handlers (pytest's, execnet's) are not this program's; those of
    # the standard library that a fresh interpreter has by now stay.
    atexit._clear()
    atexit.register(logging.shutdown)
    if "multiprocessing.util" in sys.modules:
        atexit.register(sys.modules["multiprocessing.util"]._exit_function)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))  # as `python -m` puts the working directory first
    # Logging and warnings as a fresh interpreter has them (pytest's capture removed), with
    # PYTHONWARNINGS applied as the interpreter would.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    warnings.resetwarnings()
    for action, category in (
        ("ignore", ResourceWarning),
        ("ignore", ImportWarning),
        ("ignore", PendingDeprecationWarning),
        ("ignore", DeprecationWarning),
    ):
        warnings.simplefilter(action, category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for spec in filter(None, env.get("PYTHONWARNINGS", "").split(",")):
        action, _, rest = spec.partition(":")
        message, _, rest = rest.partition(":")
        category = rest.partition(":")[0]
        warnings.filterwarnings(action, message, _category(category))

    def show(message: warnings.WarningMessage) -> None:
        sys.stderr.write(warnings.formatwarning(
            message.message, message.category, message.filename, message.lineno, message.line
        ))  # fmt: skip

    warnings._showwarnmsg_impl = show  # pytest's recording of warnings is the parent's
    warnings.showwarning = warnings._showwarning_orig
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    # `python -m` runs a fresh copy of the module as __main__: the imported one is left aside.
    sys.modules.pop(module, None)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # an uncaught exception: the traceback and exit code 1, as Python
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _category(name: str) -> type[Warning]:
    import builtins

    found = getattr(builtins, name, None) if name else Warning
    return found if isinstance(found, type) and issubclass(found, Warning) else Warning
