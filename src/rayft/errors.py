"""User-facing errors: the CLI prints their message as one line and exits with code 2."""

from __future__ import annotations


class RayftError(Exception):
    """Bad input or an impossible request; the message says what is wrong and where."""


class ConfigError(RayftError):
    """A config value that the schema or a cross-field rule rejects."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key  # the dotted key path, when one key is to blame


class TrainingFailed(Exception):
    """Training started and failed (a worker raised, past distributed.max_failures): exit code 1.
    The message is one line naming the rank, the exception and the log that holds its traceback."""


class DataError(RayftError):
    """A data file that is missing, malformed or empty."""
