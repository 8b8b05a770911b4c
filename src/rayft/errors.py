"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class RayftError(Exception):
    """Bad input or an impossible request; the message says what is wrong and where."""


class ConfigError(RayftError):
    """A config value that the schema or a cross-field rule rejects."""


class DataError(RayftError):
    """A data file that is missing, malformed or empty."""
