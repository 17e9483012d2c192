"""What every command shares: error display and table printing."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from r2led.errors import R2ledError

console = Console()
err_console = Console(stderr=True)


def run_guarded(app) -> None:
    """Run a typer app; library errors print one clear line and exit 2 instead of a traceback."""
    try:
        app(standalone_mode=True)
    except R2ledError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
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
