"""The ``r2led`` command line. One sub-module per command group; each imports lazily."""

from __future__ import annotations

import typer

from r2led.cli import bench_cmd, data_cmd, docs_cmd, main_cmd, serve_cmd, sid_cmd, train_cmd
from r2led.cli.common import GuardedGroup, run_guarded

# GuardedGroup: a bad value in any command ends it with one line on stderr and exit code 2.
app = typer.Typer(
    cls=GuardedGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Lifelong CTR prediction with semantic IDs (R2LED).",
)
app.add_typer(data_cmd.app, name="data", help="Prepare and inspect datasets.")
app.add_typer(sid_cmd.app, name="sid", help="Build and inspect semantic-ID tables.")
for _commands in (main_cmd, train_cmd, bench_cmd, serve_cmd, docs_cmd):
    _commands.register(app)


def main() -> None:  # pragma: no cover - console entry point
    run_guarded(app)
