"""The accuracy benchmark: models x seeds on one protocol, with paired significance tests.

Layout of a results folder::

    runs/<label>/seed<S>/      one trainer run folder per model (or variant) and seed
    search.json                the search on valid (when asked): every trial and the choice
    results.json               per label: overrides, per-seed metrics, mean and std, p-values
    results/                   the small JSON files the report is made from (``--publish``
                               puts them elsewhere, e.g. docs/results/; see r2led.bench.report)
    results.md                 the report: search, tables with user-clustered CIs, claims
    auc.png                    test AUC per model, mean with std error bars

The search (``--search``) is the equal grid of configs/search.yaml: the same 16 trials on
seed 0 for every model, chosen by valid AUC. Finished runs (with metrics.json) are reused, so
an interrupted search or benchmark resumes.
"""

from __future__ import annotations

import hashlib
import itertools
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

from r2led.atomic import write_json_atomic
from r2led.bench.plots import save_figure
from r2led.bench.report import publish as publish_results
from r2led.bench.report import run_record, safe_name, write_report
from r2led.bench.significance import delong_test
from r2led.config import BenchConfig, load_config
from r2led.data.store import LifelongStore
from r2led.errors import ConfigError
from r2led.terminal import console, print_table

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
        return out / "runs" / safe_name(self.label) / f"seed{seed}"


def _run_config(job: Job, seed: int, files: list[Path], overrides: list[str]):
    """The validated RunConfig of ``job`` at ``seed``."""
    tree = [*overrides, *job.overrides, f"train.seed={seed}"]
    return load_config(files, tree, base={"model": {"name": job.model}}, ignore=("bench",))


def _train(data: Path, job: Job, seed: int, run: Path, files: list[Path], overrides: list[str]) -> dict:
    """Train ``job`` at ``seed`` into ``run``, or reuse the run when it finished with these
    settings on this data and SID table (a changed default or config file, or a rebuilt store,
    would otherwise mix two models in one table)."""
    from r2led.train.run_folder import config_differences, read_run_config, verify_run
    from r2led.train.trainer import Trainer

    cfg = _run_config(job, seed, files, overrides)
    if (run / "config.yaml").is_file():
        # threads say how a run was computed, not what it computes
        diff = config_differences(read_run_config(run)[1], cfg, ignore=frozenset({"train.threads"}))
        if diff:
            raise ConfigError(
                f"{run} was trained with other settings ({'; '.join(diff)}); delete it or use another --out"
            )
    done = run / "metrics.json"
    if done.is_file():
        verify_run(run, require_finished=True)
        return json.loads(done.read_text())
    return Trainer(data, cfg, run, resume=True, show_progress=False).fit()


def _yaml_value(value) -> str:
    """A grid value as ``--set`` text that YAML reads back as the same value."""
    return json.dumps(value) if isinstance(value, (bool, str)) else repr(value)


def load_grid(path: Path | None = None) -> dict:
    """The declared search grid (configs/search.yaml): per model its trials, each a list of
    overrides, in a fixed order (lr outermost, then the knobs in the order declared).

    Returns {"lr", "common", "models": {model: {"why", "knobs", "trials"}}, "sha256"}. Refuses
    (ConfigError) a grid where a model lacks a reason or does not have exactly two knobs at two
    values each: every model gets the same number of trials.
    """
    path = Path(path or SEARCH_SPACES)
    try:
        text = path.read_text()
        spec = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"search grid {path}: {e}") from None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("lr"), list)
        or not spec["lr"]
        or not isinstance(spec.get("models"), dict)
    ):
        raise ConfigError(f"search grid {path}: expected 'lr: [...]' and 'models: {{name: {{why, knobs}}}}'")
    common = list(spec.get("common") or [])
    models = {}
    for model, entry in spec["models"].items():
        knobs = (entry or {}).get("knobs") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not str(entry.get("why") or "").strip():
            raise ConfigError(f"search grid {path}: model {model!r} needs a one-line 'why' for its knobs")
        if (
            not isinstance(knobs, dict)
            or len(knobs) != 2
            or any(not isinstance(v, list) or len(v) != 2 for v in knobs.values())
        ):
            raise ConfigError(
                f"search grid {path}: model {model!r} must declare exactly two knobs with two values each"
            )
        trials = [
            [f"train.lr={_yaml_value(lr)}", *(f"{k}={_yaml_value(v)}" for k, v in zip(knobs, values, strict=False))]
            for lr in spec["lr"]
            for values in itertools.product(*knobs.values())
        ]
        models[model] = {"why": str(entry["why"]).strip(), "knobs": knobs, "trials": trials}
    return {
        "lr": list(spec["lr"]),
        "common": common,
        "models": models,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def _trial_label(model: str, trial: list[str]) -> str:
    """search/<model>/<override values>: a trial's run folder is named by what it sets."""
    return f"search/{model}/" + ",".join(o.split(".", 1)[-1] for o in trial)


def _search_trial(
    data: Path, job: Job, trial: list[str], out: Path, files: list[Path], overrides: list[str], report_only: bool
) -> dict | None:
    """One search trial's record: its overrides, valid AUC and run folder. A trial that
    diverges (TrainingDiverged) is recorded with valid_auc None and the reason (in the run
    folder's diverged.json, so that a resumed search does not train it again); None when
    ``report_only`` and the trial has not finished."""
    from r2led.train.trainer import TrainingDiverged

    run = job.run_dir(out, 0)
    record = {"overrides": trial, "run": str(run)}
    if (run / "diverged.json").is_file():
        return {**record, "valid_auc": None, "diverged": json.loads((run / "diverged.json").read_text())["reason"]}
    if report_only and not (run / "metrics.json").is_file():
        return None
    try:
        metrics = _train(data, job, 0, run, files, overrides)
    except TrainingDiverged as e:
        write_json_atomic(run / "diverged.json", {"reason": str(e)})
        return {**record, "valid_auc": None, "diverged": str(e)}
    return {**record, "valid_auc": metrics["valid"]["auc"]}


def search_on_valid(
    data: Path,
    models: list[str],
    out: Path,
    files: list[Path],
    overrides: list[str],
    report_only: bool = False,
    grid: Path | None = None,
) -> dict[str, dict]:
    """Each model's equal search on valid: per model its trials, the chosen overrides and the
    chosen trial's run folder (also written to ``search.json``).

    The grid is declared in configs/search.yaml (``grid``: another file; see ``load_grid``):
    learning rate x two knobs x two values, the same 16 trials for every model. Each trial
    trains with seed 0; the best valid AUC wins (ties: the earlier trial). The test split is
    never looked at here. A finished trial is reused, so an interrupted search resumes.
    ``report_only``: train nothing; a model whose trials have not all finished gets no choice
    (and is left out of the tables).
    """
    spec = load_grid(grid)
    record = {}
    for model in models:
        if model not in spec["models"]:
            raise ConfigError(
                f"the search grid declares no trials for model {model!r}; add it to {grid or SEARCH_SPACES}"
            )
        trials = spec["models"][model]["trials"]
        scores = []
        for trial in trials:
            job = Job(_trial_label(model, trial), model, [*spec["common"], *trial], "search")
            scores.append(_search_trial(data, job, trial, out, files, overrides, report_only))
        scores = [t for t in scores if t is not None]
        if len(scores) < len(trials):
            console.print(f"search {model}: {len(scores)} of {len(trials)} trials finished; left out of the tables")
            continue
        ok = [i for i, t in enumerate(scores) if t["valid_auc"] is not None]
        if not ok:
            raise ConfigError(f"search {model}: every trial diverged ({scores[0]['diverged']})")
        best = max(ok, key=lambda i: (scores[i]["valid_auc"], -i))
        chosen = [*spec["common"], *scores[best]["overrides"]]
        record[model] = {
            "why": spec["models"][model]["why"],
            "trials": scores,
            "chosen": chosen,
            "run": scores[best]["run"],
        }
        console.print(
            f"search {model}: chose {' '.join(scores[best]['overrides'])} (valid AUC {scores[best]['valid_auc']:.4f})"
        )
    write_json_atomic(out / "search.json", record)
    return record


def _summary(per_seed: list[dict]) -> dict:
    out = {}
    for split in ("valid", "test"):
        vals = {m: np.array([r[split][m] for r in per_seed]) for m in METRICS}
        out[split] = {
            m: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0} for m, v in vals.items()
        }
    out["train_seconds"] = float(np.mean([r["train_seconds"] for r in per_seed]))
    out["train_samples_per_s"] = float(np.mean([r["train_samples_per_s"] for r in per_seed]))
    out["eval_samples_per_s"] = float(np.mean([r["eval_samples_per_s"] for r in per_seed]))
    return out


def run_accuracy(
    data: str | Path,
    bench: BenchConfig,
    out: str | Path,
    config_files: list[Path] | None = None,
    overrides: list[str] | None = None,
    report_only: bool = False,
    grid: Path | None = None,
    publish: Path | None = None,
) -> dict:
    """Train every job x seed (reusing finished runs), then write results.json/.md and auc.png.

    ``bench``: which models, seeds, variants and bootstrap (``BenchConfig``); ``config_files``
    and ``overrides`` set every run's ``model.*`` / ``train.*`` (a ``bench`` section is theirs).
    ``report_only``: train nothing; tabulate the runs that have finished (the tables say how
    many seeds each row has). ``grid``: the search grid (default configs/search.yaml).
    ``publish``: the folder for the small per-run JSON files and the report's inputs
    (default ``OUT/results``; ``docs/results`` in the repository); results.md is the report
    (``r2led.bench.report``) of that folder, with user-clustered bootstrap intervals
    (``bench.replicates`` user draws from ``bench.bootstrap_seed``).
    """
    models, seeds, search = list(bench.models), bench.seeds, bench.search
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = LifelongStore(data)
    files, overrides = list(config_files or []), list(overrides or [])
    t0 = time.perf_counter()
    searched = search_on_valid(data, models, out, files, overrides, report_only, grid) if search else None
    tuned = {m: r["chosen"] for m, r in searched.items()} if search else {m: [] for m in models}
    models = [m for m in models if m in tuned]
    seed_list = list(range(seeds))
    # fairness-control and ablation variants may run fewer seeds (their tables say how many)
    variant_list = seed_list[: bench.variant_seeds] if bench.variant_seeds else seed_list
    jobs = [Job(m, m, tuned[m], "main", list(seed_list)) for m in models]
    for model, record in (
        searched or {}
    ).items():  # the chosen trial is the model's seed-0 run: reused, not trained again
        seed0 = Job(model, model, [], "main").run_dir(out, 0)
        if 0 in seed_list and not seed0.exists():
            shutil.copytree(record["run"], seed0)
    if bench.fairness:
        jobs += [
            Job(f"{m} +sid", m, [*tuned[m], "model.sid_features=true"], "fairness", list(variant_list))
            for m in models
            if m != "r2led"
        ]
    if bench.ablations and "r2led" in models:
        jobs += [
            Job(f"r2led {name}", "r2led", [*tuned["r2led"], *ov], "ablation", list(variant_list))
            for name, ov in ABLATIONS.items()
        ]

    results: dict[str, dict] = {}
    records: list[dict] = []
    total = sum(len(j.seeds) for j in jobs)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("runs", total=total)
        for job in jobs:
            per_seed = []
            for seed in list(job.seeds):
                bar.update(task, description=f"{job.label} seed {seed}")
                bar.advance(task)
                if report_only and not (job.run_dir(out, seed) / "metrics.json").is_file():
                    job.seeds.remove(seed)
                    continue
                metrics = _train(data, job, seed, job.run_dir(out, seed), files, overrides)
                per_seed.append(metrics)
                settings = _run_config(job, seed, files, overrides).model_dump(mode="json")
                records.append(
                    run_record(
                        job.label, job.model, job.group, job.overrides, seed, job.run_dir(out, seed), settings, metrics
                    )
                )
            if per_seed:
                results[job.label] = {
                    "model": job.model,
                    "group": job.group,
                    "overrides": job.overrides,
                    "seeds": per_seed,
                    **_summary(per_seed),
                }

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
        "models": models,
        "published": str(publish or out / "results"),
        "config_files": [str(f) for f in files],
        "overrides": overrides,
        # each model's settings before its search overrides (R2LED's were frozen before the search)
        "defaults": {
            m: load_config(files, overrides, base={"model": {"name": m}}, ignore=("bench",)).model_dump(mode="json")
            for m in models
        },
    }
    write_json_atomic(out / "results.json", {"meta": meta, "results": results, "search": searched})
    folder = Path(publish or out / "results")
    publish_results(folder, meta, searched, load_grid(grid) if search else None, records)
    if records:
        write_report(
            folder, markdown=out / "results.md", replicates=bench.replicates, seed=bench.bootstrap_seed, data=data
        )
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
    lo = min(m - s for m, s in zip(means, stds, strict=False)) if means else 0.5
    hi = max(m + s for m, s in zip(means, stds, strict=False)) if means else 1.0
    ax.set_ylim(lo - 0.01, hi + 0.005)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.tick_params(axis="x", rotation=30)
    save_figure(fig, path, dpi=120)
