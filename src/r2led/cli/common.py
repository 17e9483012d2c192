"""What every command shares: error display (tables and the console: ``r2led.terminal``).

Errors in what the user gave end a command with one short line on stderr and exit code 2:
library errors (``R2ledError``), pydantic validation errors, YAML errors, ``OSError`` on a
path (permission denied, no space left, ...) and running out of memory. Anything else is a
bug and keeps its traceback. ``GuardedGroup`` applies this inside the click app, so the
console script, ``python -m r2led`` and ``typer.testing.CliRunner`` all behave the same.
"""

from __future__ import annotations

import errno
import sys

import click
import yaml
from pydantic import ValidationError
from typer.core import TyperGroup

from r2led.errors import MAX_MESSAGE, R2ledError, one_line
from r2led.terminal import console, print_table

__all__ = [
    "MAX_MESSAGE",
    "GuardedGroup",
    "console",
    "error_line",
    "one_line",
    "print_table",
    "report_error",
    "run_guarded",
]

# OSErrors that are about the user's files or machine, even when they name no path.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EMFILE, errno.ENAMETOOLONG}


def shorthands(given: dict, prefix: str = "") -> list[str]:
    """Options that are shorthands for ``--set``: ``KEY=VALUE`` overrides (under ``prefix``) for
    the ones given, applied after the ``--set`` ones."""
    return [f"{prefix}{key}={value}" for key, value in given.items() if value is not None]


def error_line(exc: BaseException) -> str | None:
    """The one-line message for an expected error, or None for a bug (keep its traceback)."""
    if isinstance(exc, R2ledError):
        return one_line(str(exc))
    if isinstance(exc, ValidationError):
        from r2led.config import describe_validation_error

        return one_line(f"invalid {exc.title}: {describe_validation_error(exc)}")
    if isinstance(exc, yaml.YAMLError):
        return one_line(f"not valid YAML: {getattr(exc, 'problem', None) or exc}")
    if isinstance(exc, MemoryError):
        detail = f": {exc}" if str(exc) else ""
        return one_line(f"out of memory{detail}; lower train.batch_size, train.t_max, model.dim or model.k")
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno in _USER_ERRNOS):
        reason = exc.strerror or type(exc).__name__
        path = f": {exc.filename}" if exc.filename is not None else ""
        other = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return one_line(f"{reason}{path}{other}")
    return None


def report_error(line: str) -> None:
    """Print an error line on stderr, unwrapped (one line whatever the terminal width)."""
    click.echo(f"error: {line}", err=True)


class GuardedGroup(TyperGroup):
    """The top-level command group: expected errors become one line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by error_line; bugs re-raised
            line = error_line(exc)
            if line is None:
                raise
            report_error(line)
            ctx.exit(2)


def run_guarded(app) -> None:
    """Run a typer app; library errors print one clear line and exit 2 instead of a traceback.

    ``GuardedGroup`` catches errors raised by a command; this catches the rest (for apps
    built without it, and errors raised while parsing).
    """
    try:
        app(standalone_mode=True)
    except Exception as exc:  # noqa: BLE001
        line = error_line(exc)
        if line is None:
            raise
        report_error(line)
        sys.exit(2)
