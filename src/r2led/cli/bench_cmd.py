"""``r2led bench``: accuracy, report, speed, diagnose, history, prepare, serve and train-scale."""

from __future__ import annotations

from pathlib import Path

import typer

from r2led.cli.common import shorthands

bench_app = typer.Typer(no_args_is_help=True)


def _csv(value: str) -> list[str]:
    """Comma-separated items; a comma inside brackets belongs to its item, so a variant can hold
    a list: ``"r2led,r2led:unit=[32,16]"`` -> ["r2led", "r2led:unit=[32,16]"]."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(value):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            items.append(value[start:i])
            start = i + 1
    items.append(value[start:])
    return [v.strip() for v in items if v.strip()]


def _ints(value: str, option: str) -> list[int]:
    """``"100,1000"`` -> [100, 1000]; anything else is a usage error naming the option."""
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from None


@bench_app.command("accuracy")
def accuracy(
    data: Path = typer.Argument(..., help="prepared data folder (with its SID table)"),
    out: Path = typer.Option(..., "--out", help="results folder (finished runs are reused)"),
    config: list[Path] = typer.Option(
        [], "--config", help="YAML config: model.* and train.* for every run, bench.* for the benchmark"
    ),
    set_: list[str] = typer.Option([], "--set", help="override: model.* / train.* for every run, or bench.*"),
    models: str | None = typer.Option(None, help="comma-separated model names (bench.models; default: all)"),
    seeds: int | None = typer.Option(None, help="seeds per model, 0..seeds-1 (bench.seeds) (default 3)"),
    search: bool | None = typer.Option(None, help="run each model's small search on valid first (bench.search)"),
    ablations: bool | None = typer.Option(
        None, help="also run R2LED's ablation switches (bench.ablations) (default on)"
    ),
    fairness: bool | None = typer.Option(None, help="also run every baseline with model.sid_features=true"),
    variant_seeds: int | None = typer.Option(
        None, help="seeds for the fairness and ablation variants (bench.variant_seeds; default: --seeds)"
    ),
    report_only: bool = typer.Option(False, help="train nothing: tabulate the finished runs"),
    grid: Path | None = typer.Option(None, "--grid", help="search grid YAML (default: configs/search.yaml)"),
    publish: Path | None = typer.Option(
        None, "--publish", help="folder for the per-run JSON files (default OUT/results; e.g. docs/results)"
    ),
    replicates: int | None = typer.Option(None, help="user-clustered bootstrap replicates (default 1000)"),
    bootstrap_seed: int | None = typer.Option(None, help="seed of the bootstrap's user draws (default 0)"),
) -> None:
    """Train every model x seed on the same protocol; tables, significance tests and plots.

    Benchmark settings (r2led.config.BenchConfig): defaults < bench.* in --config < --set bench.* < the options."""
    from r2led.bench.accuracy import run_accuracy
    from r2led.config import load_bench_config

    given = {
        "models": models,
        "seeds": seeds,
        "search": search,
        "ablations": ablations,
        "fairness": fairness,
        "variant_seeds": variant_seeds,
        "replicates": replicates,
        "bootstrap_seed": bootstrap_seed,
    }
    bench = load_bench_config(config, [*set_, *shorthands(given, "bench.")])
    run_accuracy(
        data, bench, out, config_files=config, overrides=set_, report_only=report_only, grid=grid, publish=publish
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
    """Regenerate the accuracy report from a results folder's JSON.

    Intervals come from the runs' predictions when present."""
    from r2led.bench.report import write_report

    path = write_report(folder, markdown=markdown, replicates=replicates, seed=bootstrap_seed, data=data)
    typer.echo(f"wrote {path}")


@bench_app.command("speed")
def speed(
    lengths: str = typer.Option("100,1000,10000,100000,1000000", help="history lengths T"),
    models: str = typer.Option(
        "",
        help="comma-separated model names or R2LED variants r2led[din], r2led[mha], r2led[unit32x16], "
        "r2led[unit16], r2led[lsh] "
        "(default: every model, R2LED's two encoders and its approximate index)",
    ),
    out: Path = typer.Option(..., "--out", help="results folder"),
    candidates: int = typer.Option(100, help="candidate items per serving request"),
    repeats: int = typer.Option(20, help="timed requests per model and length"),
    train_batch: int = typer.Option(64, help="batch size for the training-throughput measurement"),
    items: int = typer.Option(20000, help="synthetic catalogue size"),
    seed: int = typer.Option(0),
    strawman: str = typer.Option("r2led,sim-hard,eta", help="models also timed through their batch path (empty: none)"),
    strawman_max_t: int = typer.Option(100_000, help="longest history the batch-path strawman is timed at"),
    threads: int = typer.Option(
        1,
        min=1,
        max=1024,
        help="torch intra-op threads (1: as `r2led serve` runs each worker by default)",
    ),
) -> None:
    """Serving cost (warm and cold user state, the batch-path strawman, the floor), training
    throughput and memory against history length, as ratios."""
    from r2led.bench.speed import default_models, run_speed

    run_speed(
        _ints(lengths, "--lengths"), _csv(models) or default_models(), out, candidates=candidates, repeats=repeats,
        train_batch=train_batch, items=items, seed=seed, strawman=_csv(strawman), strawman_max_t=strawman_max_t,
        threads=threads,
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
    models: str | None = typer.Option(
        None, help="comma-separated model names (bench.models; default din,sim-hard,eta,twin,sdim,r2led)"
    ),
    t_max: str = typer.Option("100,1000,10000", "--t-max", help="history lengths T (train.t_max)"),
    seeds: int | None = typer.Option(None, help="seeds per model and T (bench.seeds; default 3)"),
    out: Path = typer.Option(..., "--out", help="results folder (finished runs are reused)"),
    config: list[Path] = typer.Option(
        [], "--config", help="YAML config: model.* and train.* for every run, bench.* for the benchmark"
    ),
    set_: list[str] = typer.Option([], "--set", help="override: model.* / train.* for every run, or bench.*"),
    report_only: bool = typer.Option(False, help="train nothing: tabulate the finished runs"),
) -> None:
    """Test AUC against history length T, with the Bayes ceiling and the history oracle."""
    from r2led.bench.history_curve import HISTORY_BENCH, run_history_curve
    from r2led.config import load_bench_config

    given = {"models": models, "seeds": seeds}
    bench = load_bench_config(config, [*set_, *shorthands(given, "bench.")], base={"bench": HISTORY_BENCH})
    run_history_curve(
        data, bench, _ints(t_max, "--t-max"), out, config_files=config, overrides=set_, report_only=report_only
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
    workers: str = typer.Option("1", help="`r2led serve --workers`: a number, or several comma-separated (1,2)"),
    threads: int = typer.Option(1, min=1, max=256, help="`r2led serve --threads` (torch threads per worker)"),
    out: Path | None = typer.Option(None, "--out", help="folder for serve_load.json"),
) -> None:
    """Load-test the real HTTP service: req/s, p50/p95/p99, errors, server CPU per request (model vs the rest)."""
    from r2led.bench.serve_load import run_serve_load
    from r2led.cli.common import print_table

    try:
        lengths = [int(float(t)) for t in _csv(history)]  # 1e5 is a length too
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 0:
        raise typer.BadParameter(
            f"expected comma-separated history lengths >= 0, got {history[:100]!r}", param_hint="--history"
        )
    worker_counts = _ints(workers, "--workers")
    if not worker_counts or not all(1 <= n <= 64 for n in worker_counts):
        raise typer.BadParameter(f"expected worker counts in 1..64, got {workers[:100]!r}", param_hint="--workers")
    results = run_serve_load(
        bundle,
        lengths,
        clients=clients,
        duration=duration,
        candidates=candidates,
        workers=worker_counts,
        threads=threads,
        out=out,
    )
    print_table(
        f"r2led serve: {clients} clients, {candidates} candidates, {threads} torch thread(s) per worker; "
        "times in ms, CPU in ms per request",
        ["workers", "T", "req/s", "p50", "p95", "p99", "errors", "CPU", "model", "other", "client", "load"],
        [
            [
                str(r.workers),
                str(r.history),
                f"{r.req_per_s:.1f}",
                f"{r.p50_ms:.0f}",
                f"{r.p95_ms:.0f}",
                f"{r.p99_ms:.0f}",
                str(r.errors),
                f"{r.server_cpu_ms_per_req:.2f} ({r.server_cpu_share:.0%})",
                f"{r.model_cpu_ms_per_req:.2f}",
                f"{r.other_cpu_ms_per_req:.2f}",
                f"{r.client_cpu_ms_per_req:.2f} ({r.client_cpu_share:.0%})",
                f"{r.load_average:.1f}",
            ]
            for r in results
        ],
    )
    typer.echo(
        "CPU = the server's (its share of all cores), model + other (HTTP, JSON, validation, the history store); "
        "client = the load generator's CPU per request (its share of all cores); "
        "load = 1-minute load average at the end"
    )


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


@bench_app.command("train-speed")
def train_speed(
    data: Path = typer.Argument(..., help="prepared data folder (e.g. ml-1m)"),
    models: str = typer.Option(
        "r2led,r2led:attention=mha,din,sim-hard,eta",
        help="comma-separated model names; NAME:key=value+key=value is a variant (model.key=value)",
    ),
    threads: str = typer.Option("1,2", help="torch thread counts, measured in turn"),
    steps: int = typer.Option(60, min=1, help="timed training steps per model and thread count"),
    warmup: int = typer.Option(5, min=0, help="untimed steps per model first (kernel compilation)"),
    block: int = typer.Option(5, min=1, help="steps a model runs before the next model's turn"),
    reference: str = typer.Option("sim-hard", help="ratios are samples/s over this model's"),
    config: list[Path] = typer.Option([], "--config", help="YAML config file(s) (train.batch_size, train.t_max...)"),
    set_: list[str] = typer.Option([], "--set", help="override applied to every model"),
    out: Path = typer.Option(..., "--out", help="results folder"),
) -> None:
    """Training samples/s of every model on the same batches, interleaved in one process."""
    from r2led.bench.train_scale import run_train_speed
    from r2led.cli.common import print_table

    rows = run_train_speed(
        data,
        _csv(models),
        _ints(threads, "--threads"),
        out,
        steps=steps,
        warmup=warmup,
        block=block,
        config_files=config,
        overrides=set_,
        reference=reference,
    )
    print_table(
        f"training steps: the same {steps} batches for every model; ratio = samples/s over {reference}'s",
        ["model", "threads", "samples/s", "ms/step", "faults/step", "ratio"],
        [
            [
                r.model,
                str(r.threads),
                f"{r.samples_per_s:,.0f}",
                f"{r.ms_per_step:.1f}",
                f"{r.page_faults_per_step:,.0f}",
            ]
            + [f"{r.ratio:.2f}x" if r.ratio is not None else "-"]
            for r in rows
        ],
    )


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench", help="Accuracy and speed benchmarks, and diagnostics of trained runs.")
