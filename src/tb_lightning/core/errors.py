"""Errors a user can cause. Each carries one sentence naming the path or key and the fix.

Entry points catch `UserError` and print its message without a traceback (see `task.py`).
"""


class UserError(Exception):
    """A mistake the user can fix: a bad config value, a missing folder, an unreadable file."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key, the value and what is allowed."""


class DataError(UserError):
    """The data on disk is missing or unusable; the message names the path and the fix."""


class WeightsError(UserError):
    """Pretrained weights cannot be loaded; the message says where they are looked for."""


class Stopped(BaseException):
    """A run stopped by a signal (SIGINT, SIGTERM) in `phase`; the message says how to resume.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows
    it; the entry points exit with `exit_code` (128 + the signal number, as a shell reports it).
    """

    def __init__(self, signum: int, phase: str, message: str = "") -> None:
        import signal

        name = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}.get(signum, signum)
        super().__init__(
            message
            or f"Stopped by {name} during {phase}; nothing was trained yet: run the same "
            "command again."
        )
        self.signum = signum
        self.phase = phase

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)
