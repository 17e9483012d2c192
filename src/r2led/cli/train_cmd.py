"""``r2led train`` and ``r2led evaluate``."""

from __future__ import annotations

from pathlib import Path

import typer

from r2led.cli.common import console, print_table


def train(
    data: Path = typer.Argument(..., help="prepared data folder"),
    model: str = typer.Option("r2led", "--model", help="model name (see `r2led models`)"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    config: list[Path] = typer.Option([], "--config", help="YAML config file(s), merged in order"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set model.rho=0.5 --set train.lr=1e-3"),
    seed: int | None = typer.Option(None, "--seed", help="shorthand for --set train.seed=S"),
    resume: bool = typer.Option(
        False, "--resume", help="continue from RUN/last.pt if present (same settings and data)"
    ),
    force: bool = typer.Option(False, "--force", help="replace the run already in --out (its files are deleted)"),
    max_memory: str | None = typer.Option(
        None, "--max-memory", help="memory to allow, e.g. 8GB (default: what is available now); larger runs are refused"
    ),
) -> None:
    """Train one model; early-stop on valid AUC; evaluate the best checkpoint on test."""
    from r2led.config import load_config
    from r2led.train.trainer import Trainer

    overrides = list(set_)
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    cfg = load_config(config, overrides, base={"model": {"name": model}})
    if max_memory is not None:
        from r2led.train.memory import parse_size

        parse_size(max_memory)  # a bad size is refused before the data is read
    result = Trainer(data, cfg, out, resume=resume, force=force, max_memory=max_memory).fit()
    if result:
        print_metrics(f"{model} ({out})", result)


def print_metrics(title: str, result: dict) -> None:
    rows = [
        [split, result[split]["auc"], result[split]["logloss"], result[split]["gauc"]]
        for split in ("valid", "test")
        if split in result
    ]
    print_table(title, ["split", "AUC", "LogLoss", "GAUC"], rows)
    if "train_samples_per_s" in result:
        console.print(f"train {result['train_samples_per_s']:,.0f} samples/s, total {result['seconds']:.0f} s")


def evaluate(
    run: Path = typer.Argument(..., help="run folder written by `r2led train`"),
    split: str = typer.Option("test", "--split", help="train | valid | test"),
) -> None:
    """Evaluate a run's best checkpoint on a split."""
    from r2led.atomic import write_json_atomic
    from r2led.train.trainer import evaluate_split, load_run

    model, store, cfg = load_run(run)
    metrics = evaluate_split(model, store, split, cfg)
    print_table(
        f"{cfg.model.name} on {split}",
        ["split", "AUC", "LogLoss", "GAUC", "samples"],
        [[split, metrics["auc"], metrics["logloss"], metrics["gauc"], metrics["samples"]]],
    )
    write_json_atomic(run / f"eval_{split}.json", metrics)


def models() -> None:
    """List the registered models."""
    from r2led.models.registry import MODELS

    for name in MODELS:
        console.print(name)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("models")(models)
