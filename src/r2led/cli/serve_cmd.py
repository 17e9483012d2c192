"""``r2led export`` and ``r2led serve``."""

from __future__ import annotations

from pathlib import Path

import typer

from r2led.cli.common import console


def export(
    run: Path = typer.Argument(..., help="run folder written by `r2led train`"),
    out: Path = typer.Option(..., "--out", help="folder to write the exported model to"),
    force: bool = typer.Option(False, "--force", help="replace an existing export in --out"),
) -> None:
    """Export a run's best model as a self-contained folder for `r2led serve`."""
    import json

    from r2led.serve.export import export_run

    path = export_run(run, out, force=force)
    manifest = json.loads((path / "manifest.json").read_text())
    test = manifest["metrics"].get("test", {})
    auc = f", test AUC {test['auc']:.4f}" if "auc" in test else ""
    console.print(f"exported {manifest['model']} ({manifest['items']:,} items, t_max {manifest['t_max']}{auc}) to {path}")


def serve(
    model_dir: Path = typer.Argument(..., help="folder written by `r2led export`"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    store: Path | None = typer.Option(None, "--store", help="prepared data folder: preload every user's history"),
    max_candidates: int = typer.Option(1000, "--max-candidates", min=1, help="most candidates one /score request may hold"),
) -> None:
    """Serve an exported model over HTTP (GET /health, PUT /users/U/history, POST /users/U/events, POST /score)."""
    import uvicorn

    from r2led.data.store import LifelongStore
    from r2led.serve.export import load_exported
    from r2led.serve.service import create_app

    scoring = load_exported(model_dir, max_candidates=max_candidates)
    if store is not None:
        n = scoring.load_histories(LifelongStore(store))
        console.print(f"preloaded the histories of {n:,} users from {store}")
    console.print(f"serving {scoring.name} ({scoring.n_items:,} items) on http://{host}:{port}")
    uvicorn.run(create_app(scoring), host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("serve")(serve)
