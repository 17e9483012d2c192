"""Errors raised at the library's edges, with messages a user can act on."""


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
