"""``r2led main``: the README's first command, end to end on the default data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from r2led.atomic import write_json_atomic, write_text_atomic
from r2led.cli.common import console, print_table

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ml-1m.yaml"


def main_job(
    data: Path = typer.Option(Path("data/ml-1m"), help="data folder (prepared here if missing)"),
    out: Path = typer.Option(Path("runs/main"), help="folder for the two runs and the summary"),
    dataset: str = typer.Option("ml-1m", help="dataset to prepare when the folder is empty"),
    seed: int = typer.Option(0, help="training seed"),
    models: str = typer.Option("r2led,din", help="models to train and compare"),
    config: list[Path] = typer.Option([], "--config", help="YAML config (default: the tuned ml-1m config)"),
    set_: list[str] = typer.Option([], "--set", help="override applied to every run"),
) -> None:
    """Prepare the data, build semantic IDs, train R2LED and a short-history DIN, compare on test."""
    from r2led.config import load_config
    from r2led.data.protocol import Protocol
    from r2led.data.sources import load_source
    from r2led.data.store import LifelongStore, build_store
    from r2led.sid.build import build_sid_table
    from r2led.train.run_folder import verify_run
    from r2led.train.trainer import Trainer

    t0 = time.perf_counter()
    if not (data / "manifest.json").is_file():
        console.rule(f"1/3 prepare {dataset}")
        build_store(load_source(dataset), data, Protocol())
    store = LifelongStore(data)
    console.print(f"data: {store.name}, {store.manifest['samples']} samples")
    if not (data / "sid" / "meta.json").is_file():
        console.rule("2/3 semantic IDs (all-MiniLM-L6-v2 + residual k-means)")
        table = build_sid_table(store, progress=True)
        console.print(
            f"SIDs: unique rate {table.quality['unique_sid_rate']:.3f}, built in {table.quality['build_seconds']:.1f} s"
        )
    files = config or ([DEFAULT_CONFIG] if DEFAULT_CONFIG.is_file() and store.name == "ml-1m" else [])
    results = {}
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        run = out / name
        if (run / "metrics.json").is_file():
            verify_run(run, require_finished=True)  # refuses a run of other data or another SID table
            console.print(f"{name}: reusing the finished run in {run}")
            results[name] = json.loads((run / "metrics.json").read_text())
            continue
        console.rule(f"3/3 train {name} (seed {seed})")
        cfg = load_config(files, [*set_, f"train.seed={seed}"], base={"model": {"name": name}})
        results[name] = Trainer(data, cfg, run, resume=True).fit()
    rows = [
        [
            n,
            r["test"]["auc"],
            r["test"]["logloss"],
            r["test"]["gauc"],
            r["valid"]["auc"],
            r["train_samples_per_s"],
            r["seconds"],
        ]
        for n, r in results.items()
    ]
    cols = ["model", "test AUC", "test LogLoss", "test GAUC", "valid AUC", "train samples/s", "wall s"]
    print_table(f"{store.name}: test split ({store.manifest['samples']['test']:,} rows), seed {seed}", cols, rows)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", {"results": results, "seconds": round(time.perf_counter() - t0, 1)})
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [
        "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) and v < 10 else str(v) for v in row) + " |" for row in rows
    ]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
    console.print(f"done in {time.perf_counter() - t0:.0f} s; summary in {out}/summary.md")


def register(app: typer.Typer) -> None:
    app.command("main")(main_job)
