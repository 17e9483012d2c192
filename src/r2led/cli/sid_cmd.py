"""``r2led sid build|info``: build a store's semantic-ID table and print its quality report."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import typer

from r2led.cli.common import console, print_table, shorthands

app = typer.Typer(no_args_is_help=True)


def print_quality(settings: dict, quality: dict, title: str = "SID table") -> None:
    """The quality report as two tables: the SIDs as a whole, then one row per level."""
    codebook = "x".join(str(k) for k in settings.get("codebook", []))
    rows: list[list[object]] = [
        ["items", quality["n_items"]],
        ["distinct SIDs", quality["n_sids"]],
        ["unique SID rate", quality["unique_sid_rate"]],
        ["collision rate", quality.get("collision_rate", "-")],
        ["max items per SID", quality["max_items_per_sid"]],
        ["mean items per SID", quality["mean_items_per_sid"]],
    ]
    if "semantic" in quality:
        sem = quality["semantic"]
        rows += [
            ["before --unique: unique SID rate", sem["unique_sid_rate"]],
            ["before --unique: collision rate", sem.get("collision_rate", "-")],
            ["before --unique: max items per SID", sem["max_items_per_sid"]],
        ]
    rows += [
        ["reconstruction error", quality.get("reconstruction_error", "-")],
        ["encode s" + (" (cached)" if quality.get("embedding_cache_hit") else ""), quality.get("encode_seconds", "-")],
        ["quantize s", quality.get("quantize_seconds", "-")],
        ["build s", quality.get("build_seconds", "-")],
    ]
    console.print(
        f"[bold]{title}[/]: {settings.get('encoder', '?')} x {settings.get('quantizer', '?')}, "
        f"codebook {codebook}{' + unique' if settings.get('unique') else ''}, seed {settings.get('seed', '?')}"
    )
    print_table(
        "quality",
        ["metric", "value"],
        rows,
    )
    print_table(
        "per level",
        ["lvl", "K", "used", "util", "bits", "log2K", "perplex", "prefixes", "var left", "nbr agree", "chance"],
        [
            [
                i + 1,
                lv["codebook_size"],
                lv["used_codes"],
                _fmt(lv.get("utilisation"), 2),
                _fmt(lv["entropy"], 2),
                _fmt(lv.get("entropy_max"), 1),
                _fmt(lv.get("perplexity"), 1),
                lv["prefix_vocab"],
                _fmt(lv.get("residual_variance"), 3),
                *(_fmt(v, 3) for v in _agreement(quality, i)),
            ]
            for i, lv in enumerate(quality["levels"])
        ],
    )


def _fmt(value, digits: int) -> str:
    """A number with ``digits`` decimals, or a dash when absent."""
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _agreement(quality: dict, level: int) -> list[object]:
    """(agreement, chance) of the level's prefixes with the embedding neighbours, or dashes."""
    levels = (quality.get("neighbours") or {}).get("levels") or []
    return [levels[level]["agreement"], levels[level]["chance"]] if level < len(levels) else ["-", "-"]


@app.command()
def build(
    data: Path = typer.Argument(..., help="prepared data folder"),
    config: list[Path] = typer.Option([], "--config", help="YAML file(s) of SID settings (keys as below), in order"),
    set_: list[str] = typer.Option([], "--set", help="a SID setting, e.g. --set quantizer=rq-vae --set levels=2"),
    encoder: str | None = typer.Option(None, help="minilm (default) | tfidf | collaborative"),
    quantizer: str | None = typer.Option(
        None, help="rq-kmeans (default) | rq-kmeans-balanced | rq-vae | rq-vae-sinkhorn"
    ),
    levels: int | None = typer.Option(None, help="semantic levels L (default 3)"),
    codebook: str | None = typer.Option(None, help="codes per level: one size (16, the default) or one per level"),
    seed: int | None = typer.Option(None, help="random seed (k-means, RQ-VAE, SVD) (default 0)"),
    unique: bool = typer.Option(False, "--unique", help="append a level that makes every SID distinct"),
    out: str = typer.Option("sid", help="folder name inside the data folder"),
    no_cache: bool = typer.Option(False, "--no-cache", help="re-encode even when cached embeddings match"),
    force: bool = typer.Option(
        False, "--force", help="replace an existing DATA/OUT (runs trained on the old table will be refused)"
    ),
) -> None:
    """Encode the items, quantize residually and write DATA/OUT (codes, prefix tokens, quality).

    Settings (r2led.config.SidConfig): defaults < --config files < --set < the options here."""
    from r2led.config import load_sid_config
    from r2led.sid.build import build_sid_table

    # the options are shorthands for --set KEY=VALUE, applied last
    given = {"encoder": encoder, "quantizer": quantizer, "levels": levels, "codebook": codebook, "seed": seed}
    given["unique"] = "true" if unique else None
    settings = load_sid_config(config, [*set_, *shorthands(given)])

    # RQ-VAE shows its own training bar; rich allows one live display at a time.
    training_bar = settings.quantizer.startswith("rq-vae")
    status = f"building SIDs for {data} ({settings.encoder} x {settings.quantizer})"
    with nullcontext() if training_bar else console.status(status):
        table = build_sid_table(data, settings, out=out, progress=training_bar, cache=not no_cache, force=force)
    print_quality(table.settings, table.quality)
    console.print(f"wrote {data / out} in {table.quality['build_seconds']:.1f} s")


@app.command()
def info(
    data: Path = typer.Argument(..., help="prepared data folder"),
    name: str = typer.Option("sid", help="SID table folder inside the data folder"),
) -> None:
    """Print a saved SID table's settings and quality report."""
    from r2led.data.store import LifelongStore
    from r2led.sid.table import SidTable

    n_items = LifelongStore(data).n_items if (data / "manifest.json").is_file() else None
    table = SidTable.load(data / name, n_items=n_items)
    if not {"n_items", "n_sids", "unique_sid_rate", "levels"} <= table.quality.keys():
        console.print(
            f"[bold]{data / name}[/]: {table.levels} levels, {table.n_items:,} items, "
            f"settings {table.settings}; no quality report"
        )
        return
    print_quality(table.settings, table.quality, title=str(data / name))
