"""Errors raised at the library's edges, with messages a user can act on, and their one-line form."""

MAX_MESSAGE = 300  # characters of an error line (a bad CSV quote once made a 24 MB message)


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to about ``limit`` characters."""
    line = " ".join(str(text).split())
    if len(line) > limit:
        cut = len(line) - (limit - 30)
        line = f"{line[: limit - 30]}... ({cut:,} more characters)"
    return line


class R2ledError(Exception):
    """Base class: something the user gave (a file, a column, a value) is not usable."""


class MissingPackageError(R2ledError):
    """A data or model package that the library reads from site-packages is not installed."""


class DataError(R2ledError):
    """An input table is malformed: missing file or column, NaN, unknown id, empty history."""


class ConfigError(R2ledError):
    """A configuration value is invalid."""


class CheckpointError(R2ledError):
    """A checkpoint or exported model cannot be read."""
