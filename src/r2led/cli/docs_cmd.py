"""``r2led docs``: the documentation that is generated from the code (tables of settings)."""

from __future__ import annotations

from pathlib import Path

import typer

docs_app = typer.Typer(no_args_is_help=True)

# marker in a page -> (setting prefix, the config class's name; "model:NAME" for a model's)
# `--check` exit status when a page differs from the code (0: up to date; 2: bad input; 1: a bug)
STALE = 3
TABLES = {"settings:r2led": ("model.", "model:r2led"), "settings:sid": ("", "SidConfig")}


def generated_table(marker: str) -> str:
    """The markdown table that stands between ``<!-- marker -->`` and ``<!-- /marker -->``."""
    from r2led import config

    prefix, source = TABLES[marker]
    if source.startswith("model:"):
        return config.settings_table(config.model_config_class(source.split(":", 1)[1]), prefix)
    return config.settings_table(getattr(config, source), prefix, shared=None)


@docs_app.command("settings")
def settings(
    pages: list[Path] = typer.Argument(..., help="pages to update in place, e.g. docs/method.md docs/sid.md"),
    check: bool = typer.Option(False, "--check", help="change nothing; exit 1 if a page differs from the code"),
) -> None:
    """Rewrite the generated settings tables (R2LED's switches, the SID settings) in the pages."""
    from r2led.atomic import write_text_atomic
    from r2led.config import replace_marked

    stale = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        new = text
        for marker in TABLES:
            if f"<!-- {marker} -->" in new:
                new = replace_marked(new, marker, generated_table(marker))
        if new != text:
            stale.append(str(page))
            if not check:
                write_text_atomic(page, new)
    verb = "differ from the code" if check else "updated"
    typer.echo(f"{verb}: {', '.join(stale)}" if stale else "up to date")
    if check and stale:
        raise typer.Exit(STALE)


def register(app: typer.Typer) -> None:
    app.add_typer(docs_app, name="docs", help="Regenerate the documentation's tables from the code.")
