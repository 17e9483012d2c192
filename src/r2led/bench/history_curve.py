"""``r2led bench history``: test AUC against history length T on ``synthetic-lifelong``.

For each ``t_max`` the accuracy benchmark (``r2led.bench.accuracy``) trains every model x seed
with ``train.t_max=T`` into ``OUT/t<T>/`` (finished runs are reused). Beside the models the
curve carries two references computed from the generator's truth
(``r2led.data.sources.lifelong``): the Bayes ceiling (true click probabilities) and the
history oracle (the true rule with only the last T behaviours visible). Writes::

    OUT/curve.json     per model and T: test AUC mean, std, seeds; the ceiling; the oracle
    OUT/curve.md       the same as a table
    OUT/auc_vs_t.png   one line per model, the oracle dotted, the ceiling dashed
"""

from __future__ import annotations

from pathlib import Path

from r2led.atomic import write_json_atomic, write_text_atomic
from r2led.bench.plots import save_figure
from r2led.config import BenchConfig
from r2led.data.sources.lifelong import ceiling_auc, oracle_auc
from r2led.data.store import LifelongStore
from r2led.terminal import console

# What `r2led bench history` runs unless told otherwise (BenchConfig's defaults are the accuracy benchmark's)
HISTORY_BENCH = {"models": ["din", "sim-hard", "eta", "twin", "sdim", "r2led"], "ablations": False, "replicates": 200}


def run_history_curve(
    data: str | Path,
    bench: BenchConfig,
    t_maxes: list[int],
    out: str | Path,
    config_files: list[Path] | None = None,
    overrides: list[str] | None = None,
    report_only: bool = False,
) -> dict:
    """Train models x T x seeds (``bench``; reusing finished runs); write curve.json, curve.md,
    auc_vs_t.png. ``report_only``: train nothing, tabulate the finished runs (the table gives
    seed counts)."""
    from r2led.bench.accuracy import run_accuracy

    data, out = Path(data), Path(out)
    store = LifelongStore(data)
    ceiling = ceiling_auc(store, "test")  # raises DataError for a store of another source
    oracle = {t: round(oracle_auc(store, t, "test"), 4) for t in t_maxes}
    console.print(f"Bayes ceiling (test) {ceiling:.4f}; history oracle {oracle}")
    models, seeds = bench.models, bench.seeds
    curve: dict[str, dict] = {m: {} for m in models}
    for t in t_maxes:
        results = run_accuracy(
            data,
            bench,
            out / f"t{t}",
            config_files=config_files,
            overrides=[*(overrides or []), f"train.t_max={t}"],
            report_only=report_only,
        )
        for m in models:
            if m in results:
                auc = results[m]["test"]["auc"]
                curve[m][str(t)] = {
                    "mean": round(auc["mean"], 4),
                    "std": round(auc["std"], 4),
                    "seeds": len(results[m]["seeds"]),
                    "train_samples_per_s": round(
                        sum(s["train_samples_per_s"] for s in results[m]["seeds"]) / len(results[m]["seeds"]), 1
                    ),
                }
    record = {
        "data": str(data.resolve()),
        "test_rows": int(store.manifest["samples"]["test"]),
        "seeds": seeds,
        "report_only": report_only,
        "t_max": t_maxes,
        "ceiling": round(ceiling, 4),
        "oracle": {str(t): a for t, a in oracle.items()},
        "models": curve,
        "overrides": list(overrides or []),
        "config_files": [str(f) for f in config_files or []],
    }
    write_json_atomic(out / "curve.json", record)
    write_text_atomic(out / "curve.md", curve_table(record))
    plot_curve(record, out / "auc_vs_t.png")
    console.print(curve_table(record))
    return record


def curve_table(record: dict) -> str:
    """Markdown table: one row per model (and the references), one column per T."""
    ts = [str(t) for t in record["t_max"]]
    lines = ["| model | " + " | ".join(f"T = {t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for m, row in record["models"].items():
        cells = [f"{row[t]['mean']:.4f} ± {row[t]['std']:.4f}" if t in row else "—" for t in ts]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(
        "| history oracle (true rule, last T visible) | " + " | ".join(f"{record['oracle'][t]:.4f}" for t in ts) + " |"
    )
    lines.append("| Bayes ceiling (true probabilities) | " + " | ".join(f"{record['ceiling']:.4f}" for _ in ts) + " |")
    seeds = {row[t]["seeds"] for row in record["models"].values() for t in ts if t in row}
    lines.append("")
    lines.append(
        f"Test AUC on {record['test_rows']:,} test rows, mean ± std over {'/'.join(map(str, sorted(seeds)))} seed(s)."
    )
    return "\n".join(lines) + "\n"


def plot_curve(record: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.8, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ts = record["t_max"]
    for m, row in record["models"].items():
        xs = [t for t in ts if str(t) in row]
        ax.errorbar(
            xs, [row[str(t)]["mean"] for t in xs], yerr=[row[str(t)]["std"] for t in xs], marker="o", capsize=3, label=m
        )
    ax.plot(ts, [record["oracle"][str(t)] for t in ts], ":", color="grey", marker="s", label="history oracle")
    ax.axhline(record["ceiling"], linestyle="--", color="black", label=f"Bayes ceiling {record['ceiling']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("history length T (train.t_max)")
    ax.set_ylabel("test AUC")
    ax.set_title("synthetic-lifelong: AUC against history length")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    save_figure(fig, path)
