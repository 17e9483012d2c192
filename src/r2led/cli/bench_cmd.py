"""``r2led bench accuracy``, ``r2led bench speed`` and ``r2led bench diagnose``."""

from __future__ import annotations

from pathlib import Path

import typer

bench_app = typer.Typer(no_args_is_help=True)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@bench_app.command("accuracy")
def accuracy(
    data: Path = typer.Argument(..., help="prepared data folder (with its SID table)"),
    models: str = typer.Option("r2led,din,din-long,avgpool,sim-hard,sim-soft,eta,sdim,twin", help="comma-separated model names"),
    seeds: int = typer.Option(3, help="seeds per model (0..seeds-1)"),
    out: Path = typer.Option(..., "--out", help="results folder (finished runs are reused)"),
    config: list[Path] = typer.Option([], "--config", help="YAML config applied to every run"),
    set_: list[str] = typer.Option([], "--set", help="override applied to every run"),
    search: bool = typer.Option(False, help="run each model's small search on valid first"),
    ablations: bool = typer.Option(True, help="also run R2LED's ablation switches"),
    fairness: bool = typer.Option(False, help="also run every baseline with model.sid_features=true"),
    variant_seeds: int | None = typer.Option(None, help="seeds for the fairness and ablation variants (default: --seeds)"),
    report_only: bool = typer.Option(False, help="train nothing: tabulate the finished runs"),
) -> None:
    """Train every model x seed on the same protocol; tables, significance tests and plots."""
    from r2led.bench.accuracy import run_accuracy

    run_accuracy(data, _csv(models), seeds, out, config_files=config, overrides=set_, search=search, ablations=ablations, fairness=fairness, variant_seeds=variant_seeds, report_only=report_only)


@bench_app.command("speed")
def speed(
    lengths: str = typer.Option("100,1000,10000,100000", help="history lengths T"),
    models: str = typer.Option("r2led,din,din-long,sim-hard,sim-soft,eta,sdim,twin", help="comma-separated model names"),
    out: Path = typer.Option(..., "--out", help="results folder"),
    candidates: int = typer.Option(100, help="candidate items per serving request"),
    repeats: int = typer.Option(20, help="timed requests per model and length"),
    train_batch: int = typer.Option(64, help="batch size for the training-throughput measurement"),
    items: int = typer.Option(20000, help="synthetic catalogue size"),
    seed: int = typer.Option(0),
) -> None:
    """Latency, training throughput and peak memory against history length, as ratios to R2LED."""
    from r2led.bench.speed import run_speed

    run_speed([int(t) for t in _csv(lengths)], _csv(models), out, candidates=candidates, repeats=repeats, train_batch=train_batch, items=items, seed=seed)


@bench_app.command("diagnose")
def diagnose(
    run: Path = typer.Argument(..., help="a finished R2LED run folder"),
    compare: list[Path] = typer.Option([], "--compare", help="another finished run on the same data (repeatable)"),
    out: Path = typer.Option(..., "--out", help="folder for diagnostics.json and diagnostics.md"),
    every: int = typer.Option(10, min=1, help="retrieval statistics on every N-th test sample"),
    buckets: int = typer.Option(5, min=1, help="item-popularity buckets"),
) -> None:
    """Per-route retrieval hit rates, gate weights by item popularity, AUC on tail items."""
    from r2led.bench.diagnostics import diagnose as run_diagnose

    run_diagnose(run, compare, out, every=every, n_buckets=buckets)
    typer.echo((out / "diagnostics.md").read_text())


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench", help="Accuracy and speed benchmarks, and diagnostics of trained runs.")
