"""``r2led sid build`` (implemented with the semantic-ID stage)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
