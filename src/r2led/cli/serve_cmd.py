"""``r2led export`` and ``r2led serve``."""

from __future__ import annotations

from pathlib import Path

import typer

from r2led.cli.common import console


def export(
    run: Path = typer.Argument(..., help="run folder written by `r2led train`"),
    out: Path = typer.Option(..., "--out", help="folder to write the bundle to"),
    force: bool = typer.Option(False, "--force", help="replace an existing bundle in --out"),
    allow_unfinished: bool = typer.Option(
        False, "--allow-unfinished", help="export a run without final metrics (its best checkpoint so far)"
    ),
) -> None:
    """Export a run's best model as a self-contained, hash-checked bundle for `r2led serve`."""
    import json

    from r2led.serve.bundle import export_run

    path = export_run(run, out, force=force, allow_unfinished=allow_unfinished)
    manifest = json.loads((path / "manifest.json").read_text())
    test = manifest["metrics"].get("test", {})
    auc = f", test AUC {test['auc']:.4f}" if "auc" in test else ", unfinished run"
    console.print(
        f"exported {manifest['model']} ({manifest['items']:,} items, t_max {manifest['t_max']}{auc}) to {path}"
    )


def serve(
    bundle: Path = typer.Argument(..., help="folder written by `r2led export`"),
    store: str = typer.Option(
        "histories.db", "--store", help="history store: a SQLite file (created if missing) or redis://host:port/db"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port"),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="worker processes sharing the store"),
    threads: int = typer.Option(
        1,
        "--threads",
        min=0,
        max=256,
        help="torch threads per worker (0: CPU cores / workers); scale with --workers instead: docs/serving.md",
    ),
    preload: Path | None = typer.Option(
        None,
        "--preload",
        help="prepared data folder (the run's): write every user's recent history into the store first",
    ),
    api_key_file: Path | None = typer.Option(
        None, "--api-key-file", help="file of API keys, one a line; every path but /health then needs X-API-Key"
    ),
    max_users_in_memory: int = typer.Option(
        100_000,
        "--max-users-in-memory",
        min=1,
        help="users kept in memory per worker (least recently used leave first)",
    ),
    max_candidates: int = typer.Option(1000, "--max-candidates", min=1, help="candidates per /score request"),
    max_events: int = typer.Option(1000, "--max-events", min=1, help="events per append"),
    max_key_length: int = typer.Option(256, "--max-key-length", min=1, help="characters of a user or item key"),
    max_body_bytes: int = typer.Option(4 << 20, "--max-body-bytes", min=1, help="request body cap (413 past it)"),
) -> None:
    """Serve a bundle over HTTP: GET /health, GET|PUT /users/U/history, POST /users/U/events, POST /score."""
    from r2led.serve import server
    from r2led.serve.limits import Limits, read_api_keys
    from r2led.train.distributed import usable_cores

    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_candidates=max_candidates,
        max_key_length=max_key_length,
        max_events=max_events,
    )
    if api_key_file is not None:
        read_api_keys(api_key_file)  # refuse a bad key file before loading anything
    cfg = server.ServeConfig(
        bundle=str(bundle.resolve()),
        store=store if "://" in store else str(Path(store).resolve()),
        api_key_file=str(api_key_file.resolve()) if api_key_file else None,
        max_users_in_memory=max_users_in_memory,
        threads=threads or max(1, usable_cores() // workers),
        limits=vars(limits),
    )
    if preload is not None:
        n = server.preload(cfg, preload)
        console.print(f"preloaded the histories of {n:,} users from {preload} into {store}")
    keys = "API keys required" if api_key_file else "no API keys (open to anyone who can connect)"
    console.print(
        f"serving {bundle} on http://{host}:{port} "
        f"({workers} worker{'s' if workers > 1 else ''}, store {store}, {keys})"
    )
    server.run(cfg, host, port, workers)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("serve")(serve)
