"""User-facing errors: the CLI prints their message as one line and exits with code 2."""

from __future__ import annotations


class RayftError(Exception):
    """Bad input or an impossible request; the message says what is wrong and where."""


class ConfigError(RayftError):
    """A config value that the schema or a cross-field rule rejects."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key  # the dotted key path, when one key is to blame


def one_line(error: BaseException) -> str:
    """An exception as one line, `Type: first line of its message`; a RayTaskError (a remote
    task's failure) is read as the exception it wraps."""
    error = getattr(error, "cause", None) or error
    message = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class TrainingFailed(Exception):
    """Training started and failed (a worker raised, past distributed.max_failures): exit code 1.
    The message is one line naming the rank, the exception and the log that holds its traceback."""


class DataError(RayftError):
    """A data file that is missing, malformed or empty."""
