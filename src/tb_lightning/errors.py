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
