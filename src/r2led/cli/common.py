"""What every command shares: error display and table printing.

Errors in what the user gave end a command with one short line on stderr and exit code 2:
library errors (``R2ledError``), pydantic validation errors, YAML errors, ``OSError`` on a
path (permission denied, no space left, ...) and running out of memory. Anything else is a
bug and keeps its traceback. ``GuardedGroup`` applies this inside the click app, so the
console script, ``python -m r2led`` and ``typer.testing.CliRunner`` all behave the same.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence

import click
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from r2led.errors import R2ledError

console = Console()
err_console = Console(stderr=True)

MAX_MESSAGE = 300  # characters of an error line (a bad CSV quote once made a 24 MB message)

# OSErrors that are about the user's files or machine, even when they name no path.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EMFILE, errno.ENAMETOOLONG}


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    if len(line) > limit:
        cut = len(line) - (limit - 30)
        line = f"{line[: limit - 30]}... ({cut:,} more characters)"
    return line


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


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    console.print(table)


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
