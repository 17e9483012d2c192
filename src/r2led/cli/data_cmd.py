"""``r2led data prepare|info``."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import typer

from r2led.cli.common import console, print_table

app = typer.Typer(no_args_is_help=True)


def print_manifest(manifest: dict) -> None:
    """The statistics table of a prepared store."""
    splits = ("train", "valid", "test")
    print_table(
        f"{manifest['name']}: {manifest['users']:,} users, {manifest['items']:,} items, "
        f"{manifest['interactions']:,} interactions"
        + (f" ({manifest['duplicates_dropped']:,} duplicates dropped)" if manifest.get("duplicates_dropped") else ""),
        ["split", "samples", "users", "positive rate", "hist mean", "hist p50", "hist p90", "hist max"],
        [
            [
                s,
                manifest["samples"][s],
                manifest["split_users"][s],
                manifest["positive_rate"][s],
                manifest["history"][s]["mean"],
                manifest["history"][s]["p50"],
                manifest["history"][s]["p90"],
                manifest["history"][s]["max"],
            ]
            for s in splits
        ],
    )


@app.command()
def prepare(
    name: str = typer.Argument(
        ..., help="ml-1m | ml-100k | synthetic | synthetic-lifelong | taobao | amazon | kuairand"
    ),
    out: Path = typer.Option(..., "--out", help="data folder to write"),
    force: bool = typer.Option(False, help="replace an existing store"),
    path: Path | None = typer.Option(None, help="input file or folder (taobao, amazon, kuairand)"),
    users: int | None = typer.Option(None, min=1, help="synthetic: number of users [1000; synthetic-lifelong: 300]"),
    length: int | None = typer.Option(
        None, min=1, help="synthetic: behaviours per user, mean [200; synthetic-lifelong: 10000]"
    ),
    items: int | None = typer.Option(None, min=1, help="synthetic: catalogue size [2000; synthetic-lifelong: 4000]"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="synthetic: random seed"),
    samples_last_n: int | None = typer.Option(None, help="only each user's last n rows become samples"),
    min_history: int = typer.Option(5, help="drop samples with fewer earlier rows"),
    label_threshold: float = typer.Option(
        3.0, help="label = signal > threshold (ratings: 3; taobao: 1 = cart/fav/buy, 3 = buy; kuairand: 1 = click)"
    ),
) -> None:
    """Read a source, apply the protocol and write a LifelongStore folder with manifest.json."""
    from pydantic import ValidationError

    from r2led.config import describe_validation_error
    from r2led.data.protocol import Protocol
    from r2led.data.sources import load_source
    from r2led.data.store import build_store
    from r2led.errors import ConfigError

    t0 = time.perf_counter()
    options: dict = {}
    if name in ("synthetic", "synthetic-lifelong"):  # generated block by block, streamed into the store
        given = {"users": users, "length": length, "items": items}
        options = {"seed": seed, "lazy": True, **{k: v for k, v in given.items() if v is not None}}
    elif name in ("taobao", "amazon", "kuairand"):
        if path is None:
            raise typer.BadParameter(f"{name} needs --path to the raw files", param_hint="--path")
        options = {"path": path}
    if not math.isfinite(label_threshold):
        raise typer.BadParameter(f"must be a finite number, got {label_threshold}", param_hint="--label-threshold")
    try:  # the protocol's ranges are declared on its fields; check them before reading anything
        protocol = Protocol(min_history=min_history, samples_last_n=samples_last_n, label_threshold=label_threshold)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, owner=Protocol, as_options=True)) from None
    with console.status(f"reading {name}"):
        tables = load_source(name, **options)
    with console.status(f"writing store to {out}"):
        store = build_store(tables, out, protocol, force=force)
    print_manifest(store.manifest)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    console.print(f"wrote {out}/manifest.json in {time.perf_counter() - t0:.1f} s, peak memory {peak_mb:,.0f} MB")


@app.command()
def info(data: Path = typer.Argument(..., help="prepared data folder")) -> None:
    """Print a prepared store's statistics from its manifest."""
    from r2led.data.store import LifelongStore
    from r2led.errors import DataError
    from r2led.sid.table import SidTable

    store = LifelongStore(data)
    print_manifest(store.manifest)
    if (data / "sid" / "meta.json").is_file():
        try:
            console.print(f"SID table: {SidTable.load(data / 'sid', n_items=store.n_items).settings}")
        except DataError as exc:  # the store itself is fine; say what is wrong with its table
            console.print(f"SID table: unusable: {exc}", soft_wrap=True)
