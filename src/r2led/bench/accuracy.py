"""The accuracy benchmark: models x seeds on one protocol, with paired significance tests.

Layout of a results folder::

    runs/<label>/seed<S>/      one trainer run folder per model (or variant) and seed
    search.json                the search on valid (when asked): trials and the choice
    results.json               per label: overrides, per-seed metrics, mean and std, p-values
    results.md                 the tables (main, fairness control, ablations)
    auc.png                    test AUC per model, mean with std error bars

Finished runs (with metrics.json) are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from r2led.cli.common import console, print_table
from r2led.config import load_config
from r2led.errors import ConfigError
from r2led.data.store import LifelongStore
from r2led.bench.significance import delong_test

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "configs" / "search.yaml"

# R2LED's ablation switches (method.md), each one run with the same seeds.
ABLATIONS: dict[str, list[str]] = {
    "rho=0 (no semantic view)": ["model.rho=0"],
    "rho=1 (semantic first)": ["model.rho=1"],
    "routes=1": ["model.routes=1"],
    "gate=off": ["model.gate=off"],
    "route_fusion=mean": ["model.route_fusion=mean"],
    "sid=off": ["model.sid=off"],
    "sid_refine=off (SIDs in retrieval only)": ["model.sid_refine=off"],
    "disjoint_routes=off (routes may share behaviours)": ["model.disjoint_routes=off"],
    "route_mass=off (fusion without route mass)": ["model.route_mass=off"],
}
METRICS = ("auc", "logloss", "gauc")


@dataclass
class Job:
    label: str  # row name in the tables
    model: str
    overrides: list[str]
    group: str  # main | fairness | ablation
    seeds: list[int] = field(default_factory=list)

    def run_dir(self, out: Path, seed: int) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in self.label)
        return out / "runs" / safe / f"seed{seed}"


def _train(data: Path, job: Job, seed: int, run: Path, files: list[Path], overrides: list[str]) -> dict:
    from r2led.train.trainer import Trainer

    cfg = load_config(files, [*overrides, *job.overrides, f"train.seed={seed}"], base={"model": {"name": job.model}})
    done = run / "metrics.json"
    if (run / "config.yaml").is_file():
        _check_same_settings(run, cfg)
    if done.is_file():
        return json.loads(done.read_text())
    return Trainer(data, cfg, run, resume=True, show_progress=False).fit()


def _check_same_settings(run: Path, cfg) -> None:
    """Refuse to reuse (or resume) a run folder trained with other settings than ``cfg``:
    a changed default or config file would otherwise mix two models in one table."""
    from r2led.train.trainer import read_run_config

    saved = read_run_config(run)[1].model_dump()
    wanted = cfg.model_dump()
    ignore = {("train", "threads")}  # how a run was computed, not what it computes
    diff = [
        f"{section}.{key}: {saved[section].get(key)!r} in the run, {value!r} now"
        for section in ("model", "train")
        for key, value in wanted[section].items()
        if (section, key) not in ignore and saved[section].get(key) != value
    ]
    if saved["sid"] != wanted["sid"]:
        diff.append(f"sid: {saved['sid']!r} in the run, {wanted['sid']!r} now")
    if diff:
        raise ConfigError(f"{run} was trained with other settings; delete it or use another --out:\n  " + "\n  ".join(diff))


def search_on_valid(
    data: Path, models: list[str], out: Path, files: list[Path], overrides: list[str], report_only: bool = False
) -> dict[str, dict]:
    """Each model's small search on valid (the same number of trials for every model): per
    model its trials, the chosen overrides and the chosen trial's run folder (also written to
    ``search.json``).

    Trials are listed in configs/search.yaml; each trains with seed 0 and the trial's
    overrides; the best valid AUC wins. The test split is never looked at here.
    ``report_only``: train nothing; a model whose trials have not all finished gets no choice
    (and is left out of the tables).
    """
    spaces = yaml.safe_load(SEARCH_SPACES.read_text())
    budget = spaces["budget"]
    record = {}
    for model in models:
        trials = [[]] + [list(t) for t in spaces["models"].get(model, [])][: budget - 1]
        scores = []
        for i, trial in enumerate(trials):
            job = Job(f"search/{model}/{i}", model, [*spaces.get("common", []), *trial], "search")
            if report_only and not (job.run_dir(out, 0) / "metrics.json").is_file():
                break
            metrics = _train(data, job, 0, job.run_dir(out, 0), files, overrides)
            scores.append({"overrides": trial, "valid_auc": metrics["valid"]["auc"]})
        if len(scores) < len(trials):
            console.print(f"search {model}: {len(scores)} of {len(trials)} trials finished; left out of the tables")
            continue
        best = max(range(len(scores)), key=lambda i: scores[i]["valid_auc"])
        chosen = [*spaces.get("common", []), *scores[best]["overrides"]]
        record[model] = {"trials": scores, "chosen": chosen, "run": str(Job(f"search/{model}/{best}", model, [], "search").run_dir(out, 0))}
        console.print(f"search {model}: chose {scores[best]['overrides'] or 'defaults'} (valid AUC {scores[best]['valid_auc']:.4f})")
    (out / "search.json").write_text(json.dumps(record, indent=2))
    return record


def _summary(per_seed: list[dict]) -> dict:
    out = {}
    for split in ("valid", "test"):
        vals = {m: np.array([r[split][m] for r in per_seed]) for m in METRICS}
        out[split] = {m: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0} for m, v in vals.items()}
    out["train_seconds"] = float(np.mean([r["train_seconds"] for r in per_seed]))
    out["train_samples_per_s"] = float(np.mean([r["train_samples_per_s"] for r in per_seed]))
    out["eval_samples_per_s"] = float(np.mean([r["eval_samples_per_s"] for r in per_seed]))
    return out


def run_accuracy(
    data: str | Path,
    models: list[str],
    seeds: int,
    out: str | Path,
    config_files: list[Path] | None = None,
    overrides: list[str] | None = None,
    search: bool = False,
    ablations: bool = True,
    fairness: bool = False,
    variant_seeds: int | None = None,
    report_only: bool = False,
) -> dict:
    """Train every job x seed (reusing finished runs), then write results.json/.md and auc.png.

    ``report_only``: train nothing; tabulate the runs that have finished (the tables say how
    many seeds each row has).
    """
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = LifelongStore(data)
    files, overrides = list(config_files or []), list(overrides or [])
    t0 = time.perf_counter()
    searched = search_on_valid(data, models, out, files, overrides, report_only) if search else None
    tuned = {m: r["chosen"] for m, r in searched.items()} if search else {m: [] for m in models}
    models = [m for m in models if m in tuned]
    seed_list = list(range(seeds))
    # fairness-control and ablation variants may run fewer seeds (their tables say how many)
    variant_list = seed_list[: variant_seeds] if variant_seeds else seed_list
    jobs = [Job(m, m, tuned[m], "main", list(seed_list)) for m in models]
    for model, record in (searched or {}).items():  # the chosen trial is the model's seed-0 run: reused, not trained again
        seed0 = Job(model, model, [], "main").run_dir(out, 0)
        if 0 in seed_list and not seed0.exists():
            shutil.copytree(record["run"], seed0)
    if fairness:
        jobs += [Job(f"{m} +sid", m, [*tuned[m], "model.sid_features=true"], "fairness", list(variant_list)) for m in models if m != "r2led"]
    if ablations and "r2led" in models:
        jobs += [Job(f"r2led {name}", "r2led", [*tuned["r2led"], *ov], "ablation", list(variant_list)) for name, ov in ABLATIONS.items()]

    results: dict[str, dict] = {}
    total = sum(len(j.seeds) for j in jobs)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("runs", total=total)
        for job in jobs:
            per_seed = []
            for seed in list(job.seeds):
                bar.update(task, description=f"{job.label} seed {seed}")
                bar.advance(task)
                if report_only and not (job.run_dir(out, seed) / "metrics.json").is_file():
                    job.seeds.remove(seed)
                    continue
                per_seed.append(_train(data, job, seed, job.run_dir(out, seed), files, overrides))
            if per_seed:
                results[job.label] = {"model": job.model, "group": job.group, "overrides": job.overrides, "seeds": per_seed, **_summary(per_seed)}

    _significance(store, jobs, results, out)
    meta = {
        "data": str(data.resolve()),
        "dataset": store.name,
        "test_rows": int(store.manifest["samples"]["test"]),
        "seeds": seed_list,
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "seconds": round(time.perf_counter() - t0, 1),
        "search": search,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "search": searched}, indent=2))
    (out / "results.md").write_text(render_markdown(meta, results, searched))
    plot_auc(results, out / "auc.png")
    print_table(
        f"{store.name} test split, {seeds} seed(s): mean ± std",
        ["model", "AUC", "LogLoss", "GAUC", "max p vs R2LED"],
        [[k, _pm(v, "auc"), _pm(v, "logloss"), _pm(v, "gauc"), _pmax(v)] for k, v in results.items()],
    )
    return results


def _significance(store: LifelongStore, jobs: list[Job], results: dict, out: Path) -> None:
    """DeLong's test of R2LED against every other label, seed by seed, on the same test rows."""
    if "r2led" not in results:
        return
    label = store.sample_arrays["label"][store.split_indices("test")]
    ref = {s: Job("r2led", "r2led", [], "main").run_dir(out, s) for s in range(len(results["r2led"]["seeds"]))}
    for job in jobs:
        if job.label == "r2led" or job.label not in results:
            continue
        pvals = []
        for seed in job.seeds:
            a, b = ref.get(seed), job.run_dir(out, seed)
            if a is None or not (a / "test_pred.npy").is_file() or not (b / "test_pred.npy").is_file():
                continue
            pa, pb = np.load(a / "test_pred.npy"), np.load(b / "test_pred.npy")
            if len(pa) != len(label) or len(pb) != len(label):
                continue  # runs evaluated on a subsample
            pvals.append(delong_test(label, pa, pb)["p"])
        results[job.label]["delong_p_vs_r2led"] = pvals


def _pm(v: dict, metric: str, split: str = "test") -> str:
    return f"{v[split][metric]['mean']:.4f} ± {v[split][metric]['std']:.4f}"


def _pmax(v: dict) -> str:
    p = v.get("delong_p_vs_r2led")
    return "—" if not p else f"{max(p):.2g}"


def render_markdown(meta: dict, results: dict, searched: dict | None = None) -> str:
    lines = [
        f"# Accuracy on {meta['dataset']} ({meta['test_rows']:,} test rows)",
        "",
        f"Seeds {meta['seeds']}; metrics on the test split (valid AUC: the split runs are selected on) as mean ± std over seeds; p: DeLong's test of R2LED's AUC",
        "against the row's, per seed on the same test rows (the largest p over seeds is shown).",
        f"Date {meta['date']}; machine {meta['machine']}; benchmark wall time {meta['seconds']:.0f} s.",
        "",
    ]
    if searched:
        width = max(len(r["trials"]) for r in searched.values())
        lines += [
            "## Search on valid (seed 0; valid AUC of each trial; the best one is used for every seed)",
            "",
            "| model | " + " | ".join(["defaults", *[f"trial {i}" for i in range(1, width)]]) + " | chosen |",
            "|---|" + "---|" * (width + 1),
        ]
        for model, record in searched.items():
            cells = [f"{' '.join(t['overrides']) or 'defaults'}: {t['valid_auc']:.4f}" for t in record["trials"]]
            cells += [""] * (width - len(cells))
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {' '.join(record['chosen']) or 'defaults'} |")
        lines.append("")
    for group, title in (("main", "Models"), ("fairness", "Fairness control: baselines with SID prefix features"), ("ablation", "R2LED ablations")):
        rows = {k: v for k, v in results.items() if v["group"] == group}
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| model | seeds | valid AUC | AUC | LogLoss | GAUC | p (AUC vs R2LED) | train s | train samples/s | infer samples/s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k, v in rows.items():
            lines.append(
                f"| {k} | {len(v['seeds'])} | {_pm(v, 'auc', 'valid')} | {_pm(v, 'auc')} | {_pm(v, 'logloss')} | {_pm(v, 'gauc')} | {_pmax(v)} | "
                f"{v['train_seconds']:.0f} | {v['train_samples_per_s']:,.0f} | {v['eval_samples_per_s']:,.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_auc(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = {k: v for k, v in results.items() if v["group"] == "main"}
    fig = Figure(figsize=(max(5, 0.9 * len(rows) + 2), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = list(rows)
    means = [rows[n]["test"]["auc"]["mean"] for n in names]
    stds = [rows[n]["test"]["auc"]["std"] for n in names]
    colors = ["tab:red" if n == "r2led" else "tab:gray" for n in names]
    ax.bar(names, means, yerr=stds, capsize=4, color=colors)
    lo = min(m - s for m, s in zip(means, stds)) if means else 0.5
    hi = max(m + s for m, s in zip(means, stds)) if means else 1.0
    ax.set_ylim(lo - 0.01, hi + 0.005)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.tick_params(axis="x", rotation=30)
    fig.savefig(path, dpi=120)
