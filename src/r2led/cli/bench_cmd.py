"""``r2led bench accuracy``, ``r2led bench speed`` and ``r2led bench diagnose``."""

from __future__ import annotations

from pathlib import Path

import typer

bench_app = typer.Typer(no_args_is_help=True)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str, option: str) -> list[int]:
    """``"100,1000"`` -> [100, 1000]; anything else is a usage error naming the option."""
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from None


@bench_app.command("accuracy")
def accuracy(
    data: Path = typer.Argument(..., help="prepared data folder (with its SID table)"),
    models: str = typer.Option(
        "r2led,din,din-long,avgpool,sim-hard,sim-soft,eta,sdim,twin", help="comma-separated model names"
    ),
    seeds: int = typer.Option(3, min=1, help="seeds per model (0..seeds-1)"),
    out: Path = typer.Option(..., "--out", help="results folder (finished runs are reused)"),
    config: list[Path] = typer.Option([], "--config", help="YAML config applied to every run"),
    set_: list[str] = typer.Option([], "--set", help="override applied to every run"),
    search: bool = typer.Option(False, help="run each model's small search on valid first"),
    ablations: bool = typer.Option(True, help="also run R2LED's ablation switches"),
    fairness: bool = typer.Option(False, help="also run every baseline with model.sid_features=true"),
    variant_seeds: int | None = typer.Option(
        None, min=1, help="seeds for the fairness and ablation variants (default: --seeds)"
    ),
    report_only: bool = typer.Option(False, help="train nothing: tabulate the finished runs"),
    grid: Path | None = typer.Option(None, "--grid", help="search grid YAML (default: configs/search.yaml)"),
    publish: Path | None = typer.Option(
        None, "--publish", help="folder for the per-run JSON files (default OUT/results; e.g. docs/results)"
    ),
    replicates: int = typer.Option(1000, min=1, help="user-clustered bootstrap replicates"),
    bootstrap_seed: int = typer.Option(0, help="seed of the bootstrap's user draws"),
) -> None:
    """Train every model x seed on the same protocol; tables, significance tests and plots."""
    from r2led.bench.accuracy import run_accuracy

    run_accuracy(
        data,
        _csv(models),
        seeds,
        out,
        config_files=config,
        overrides=set_,
        search=search,
        ablations=ablations,
        fairness=fairness,
        variant_seeds=variant_seeds,
        report_only=report_only,
        grid=grid,
        publish=publish,
        replicates=replicates,
        bootstrap_seed=bootstrap_seed,
    )


@bench_app.command("report")
def report(
    folder: Path = typer.Argument(..., help="results folder with benchmark.json and runs/ (e.g. docs/results/)"),
    markdown: Path | None = typer.Option(
        None, "--markdown", help="report to write (default: FOLDER.md, e.g. docs/results.md)"
    ),
    replicates: int | None = typer.Option(None, min=1, help="bootstrap replicates (default: as recorded, else 1000)"),
    bootstrap_seed: int | None = typer.Option(
        None, help="seed of the bootstrap's user draws (default: as recorded, else 0)"
    ),
    data: Path | None = typer.Option(
        None, "--data", help="prepared data folder (default: the one the benchmark recorded)"
    ),
) -> None:
    """Regenerate the accuracy report from a results folder's JSON (intervals from the runs' predictions when present)."""
    from r2led.bench.report import write_report

    path = write_report(folder, markdown=markdown, replicates=replicates, seed=bootstrap_seed, data=data)
    typer.echo(f"wrote {path}")


@bench_app.command("speed")
def speed(
    lengths: str = typer.Option("100,1000,10000,100000,1000000", help="history lengths T"),
    models: str = typer.Option(
        "r2led,din,din-long,avgpool,sim-hard,sim-soft,eta,sdim,twin", help="comma-separated model names"
    ),
    out: Path = typer.Option(..., "--out", help="results folder"),
    candidates: int = typer.Option(100, help="candidate items per serving request"),
    repeats: int = typer.Option(20, help="timed requests per model and length"),
    train_batch: int = typer.Option(64, help="batch size for the training-throughput measurement"),
    items: int = typer.Option(20000, help="synthetic catalogue size"),
    seed: int = typer.Option(0),
    strawman: str = typer.Option("r2led,sim-hard,eta", help="models also timed through their batch path (empty: none)"),
    strawman_max_t: int = typer.Option(100_000, help="longest history the batch-path strawman is timed at"),
) -> None:
    """Serving cost (warm and cold user state, the batch-path strawman, the floor), training
    throughput and memory against history length, as ratios."""
    from r2led.bench.speed import run_speed

    run_speed(
        _ints(lengths, "--lengths"), _csv(models), out, candidates=candidates, repeats=repeats, train_batch=train_batch,
        items=items, seed=seed, strawman=_csv(strawman), strawman_max_t=strawman_max_t,
    )  # fmt: skip


@bench_app.command("diagnose")
def diagnose(
    run: Path = typer.Argument(..., help="a finished R2LED run folder"),
    compare: list[Path] = typer.Option([], "--compare", help="another finished run on the same data (repeatable)"),
    out: Path = typer.Option(..., "--out", help="folder for diagnostics.json and diagnostics.md"),
    every: int | None = typer.Option(
        None, min=1, help="retrieval statistics on every N-th sample (default: configs/analysis.yaml, 10)"
    ),
    buckets: int | None = typer.Option(None, min=1, help="item-popularity buckets (default: configs/analysis.yaml, 5)"),
    split: str | None = typer.Option(None, help="valid (default, configs/analysis.yaml) | test (final tables only)"),
) -> None:
    """Per-route retrieval hit rates, gate weights by item popularity, AUC on tail items (on valid by default)."""
    from r2led.bench.diagnostics import diagnose as run_diagnose

    run_diagnose(run, compare, out, every=every, n_buckets=buckets, split=split)
    typer.echo((out / "diagnostics.md").read_text())


@bench_app.command("history")
def history(
    data: Path = typer.Argument(..., help="a store prepared from synthetic-lifelong (with its SID table)"),
    models: str = typer.Option("din,sim-hard,eta,twin,sdim,r2led", help="comma-separated model names"),
    t_max: str = typer.Option("100,1000,10000", "--t-max", help="history lengths T (train.t_max)"),
    seeds: int = typer.Option(3, min=1, help="seeds per model and T"),
    out: Path = typer.Option(..., "--out", help="results folder (finished runs are reused)"),
    config: list[Path] = typer.Option([], "--config", help="YAML config applied to every run"),
    set_: list[str] = typer.Option([], "--set", help="override applied to every run"),
    report_only: bool = typer.Option(False, help="train nothing: tabulate the finished runs"),
) -> None:
    """Test AUC against history length T, with the Bayes ceiling and the history oracle."""
    from r2led.bench.history_curve import run_history_curve

    run_history_curve(
        data,
        _csv(models),
        _ints(t_max, "--t-max"),
        seeds,
        out,
        config_files=config,
        overrides=set_,
        report_only=report_only,
    )


@bench_app.command("prepare")
def prepare(
    rows: str = typer.Option("10000000,100000000", help="interaction counts to measure"),
    length: int = typer.Option(1000, min=1, help="behaviours per user (users = rows / length)"),
    items: int = typer.Option(20000, min=64, help="synthetic catalogue size"),
    chunk_rows: int = typer.Option(1 << 22, min=1, help="rows the writer holds in memory at a time"),
    out: Path = typer.Option(..., "--out", help="results folder (work files go there and are removed)"),
) -> None:
    """Store preparation: rows/s and peak RSS against the number of rows (out of core)."""
    from r2led.bench.prepare import run_prepare_bench

    run_prepare_bench([int(float(r)) for r in _csv(rows)], length, items, out, chunk_rows=chunk_rows)


@bench_app.command("serve")
def serve_load(
    bundle: Path = typer.Argument(..., help="bundle written by `r2led export`"),
    clients: int = typer.Option(32, min=1, max=1024, help="concurrent clients, one connection each"),
    duration: float = typer.Option(30.0, min=1, max=3600, help="seconds of load per history length"),
    history: str = typer.Option("1000,100000", help="history lengths T of the clients' users"),
    candidates: int = typer.Option(100, min=1, max=100_000, help="candidates per /score request"),
    workers: int = typer.Option(1, min=1, max=64, help="`r2led serve --workers`"),
    threads: int = typer.Option(1, min=1, max=256, help="`r2led serve --threads` (torch threads per worker)"),
    out: Path | None = typer.Option(None, "--out", help="folder for serve_load.json"),
) -> None:
    """Load-test the real HTTP service: req/s, p50/p95/p99, errors, server CPU per request (model vs the rest)."""
    from r2led.bench.serve_load import run_serve_load
    from r2led.cli.common import print_table

    lengths = [int(float(t)) for t in _csv(history)]
    if not lengths or min(lengths) < 0:
        raise typer.BadParameter(
            f"expected comma-separated history lengths >= 0, got {history[:100]!r}", param_hint="--history"
        )
    results = run_serve_load(
        bundle,
        lengths,
        clients=clients,
        duration=duration,
        candidates=candidates,
        workers=workers,
        threads=threads,
        out=out,
    )
    print_table(
        f"r2led serve: {clients} clients, {candidates} candidates, {workers} worker(s) x {threads} thread(s); times in ms, CPU per request",
        ["T", "req/s", "p50", "p95", "p99", "errors", "CPU", "model", "other"],
        [
            [
                str(r.history),
                f"{r.req_per_s:.1f}",
                f"{r.p50_ms:.0f}",
                f"{r.p95_ms:.0f}",
                f"{r.p99_ms:.0f}",
                str(r.errors),
                f"{r.server_cpu_ms_per_req:.2f}",
                f"{r.model_cpu_ms_per_req:.2f}",
                f"{r.other_cpu_ms_per_req:.2f}",
            ]
            for r in results
        ],
    )
    typer.echo("other = the server's CPU outside the model: HTTP, JSON, validation, the history store")


@bench_app.command("train-scale")
def train_scale(
    data: Path = typer.Argument(..., help="prepared data folder with long histories (e.g. synthetic-lifelong)"),
    models: str = typer.Option("r2led,sim-hard", help="comma-separated model names"),
    t_max: str = typer.Option("100,1000,10000", "--t-max", help="history lengths T (train.t_max)"),
    max_train: int = typer.Option(4096, min=1, help="training samples per run"),
    max_eval: int = typer.Option(2048, min=1, help="valid and test samples per run"),
    out: Path = typer.Option(..., "--out", help="results folder"),
    set_: list[str] = typer.Option([], "--set", help="override applied to every run"),
) -> None:
    """Training throughput and peak memory against T_max, one process per run."""
    from r2led.bench.train_scale import run_train_scale

    run_train_scale(
        data, _csv(models), _ints(t_max, "--t-max"), out, max_train=max_train, max_eval=max_eval, overrides=set_
    )


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench", help="Accuracy and speed benchmarks, and diagnostics of trained runs.")
