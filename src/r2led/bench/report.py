"""The accuracy report, regenerated from small committed JSON files.

A results folder (``docs/results/`` in the repository) holds what was measured, never
predictions::

    benchmark.json              meta (data, protocol, seeds, date, machine), the search grid
                                and its record (every trial's valid AUC, the choice)
    runs/<label>/seed<S>.json   one per run: label, model, group, overrides, seed, the full run
                                settings, metrics (valid / test AUC, LogLoss, GAUC, timings),
                                the run folder and the sha256 of its test_pred.npy
    intervals.json              the computed user-clustered CIs and DeLong p-values, with the
                                prediction fingerprints they were computed from

``r2led bench report DIR`` writes ``DIR.md`` (``docs/results/`` -> ``docs/results.md``). The
intervals need the predictions: they are read from the run folders when present (and their
sha256 matches the record), and written to ``intervals.json``; without them, the recorded
intervals are used when their fingerprints match, so the markdown regenerates from the
repository alone. Claims: "R2LED ahead" only where the clustered 95% CI of the seed-pooled
difference excludes 0; otherwise "not separable".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from r2led.atomic import write_json_atomic, write_text_atomic
from r2led.bench.significance import (
    CI_LEVEL,
    UserBootstrap,
    clustered_comparison,
    delong_test,
    percentile_ci,
    pooled_auc,
)
from r2led.errors import DataError

REFERENCE = "r2led"
DEFAULT_REPLICATES = 1000
GROUPS = (
    ("main", "Models"),
    ("fairness", "Fairness control: baselines with SID prefix features"),
    ("ablation", "R2LED ablations (at R2LED's chosen setting)"),
)
METRICS = ("auc", "logloss", "gauc")


def safe_name(label: str) -> str:
    """A label as a folder name (``r2led rho=0 (no semantic view)`` -> ``r2led_rho=0__no_semantic_view_``)."""
    return "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in label)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_record(
    label: str, model: str, group: str, overrides: list[str], seed: int, run: Path, settings: dict, metrics: dict
) -> dict:
    """The small JSON record of one finished run (no predictions: their fingerprint)."""
    pred = Path(run) / "test_pred.npy"
    return {
        "label": label,
        "model": model,
        "group": group,
        "overrides": list(overrides),
        "seed": int(seed),
        "run": str(run),
        "test_pred_sha256": file_sha256(pred) if pred.is_file() else None,
        "settings": settings,
        "metrics": {
            "valid": {m: metrics["valid"][m] for m in METRICS},
            "test": {m: metrics["test"][m] for m in METRICS},
            **{
                k: metrics.get(k)
                for k in ("train_seconds", "train_samples_per_s", "eval_samples_per_s", "best_epoch", "parameters")
            },
        },
    }


def publish(folder: Path, meta: dict, search: dict | None, grid: dict | None, records: list[dict]) -> None:
    """Write benchmark.json and one runs/<label>/seed<S>.json per record into ``folder``.

    Run files of an earlier benchmark that ``records`` no longer hold are removed, so that the
    folder describes one benchmark.
    """
    folder = Path(folder)
    write_json_atomic(folder / "benchmark.json", {"format": 1, "meta": meta, "grid": grid, "search": search})
    keep = set()
    for r in records:
        path = folder / "runs" / safe_name(r["label"]) / f"seed{r['seed']}.json"
        write_json_atomic(path, r)
        keep.add(path)
    for old in (folder / "runs").glob("*/seed*.json"):
        if old not in keep:
            old.unlink()
            if not any(old.parent.iterdir()):
                old.parent.rmdir()


def load_results(folder: Path) -> tuple[dict, dict[str, dict]]:
    """(benchmark, rows): rows by label in the order of GROUPS then label, each with its
    model, group, overrides and per-seed records sorted by seed."""
    folder = Path(folder)
    bench_file = folder / "benchmark.json"
    if not bench_file.is_file():
        raise DataError(f"{folder} has no benchmark.json: not a results folder (bench accuracy --publish writes one)")
    benchmark = json.loads(bench_file.read_text())
    files = sorted((folder / "runs").glob("*/seed*.json"))
    if not files:
        raise DataError(
            f"{folder} holds no run results yet (runs/<label>/seed<S>.json); "
            f"run bench accuracy --publish {folder} first"
        )
    rows: dict[str, dict] = {}
    for f in files:
        r = json.loads(f.read_text())
        row = rows.setdefault(
            r["label"], {"model": r["model"], "group": r["group"], "overrides": r["overrides"], "seeds": []}
        )
        row["seeds"].append(r)
    order = {g: i for i, (g, _) in enumerate(GROUPS)}
    main_order = list((benchmark.get("meta") or {}).get("models") or [])

    def key(kv: tuple[str, dict]) -> tuple:
        """Group (main, fairness, ablation), then the benchmark's model order, then the label."""
        return (
            order.get(kv[1]["group"], 9),
            main_order.index(kv[1]["model"]) if kv[1]["model"] in main_order else 99,
            kv[0],
        )

    rows = dict(sorted(rows.items(), key=key))
    for row in rows.values():
        row["seeds"].sort(key=lambda r: r["seed"])
    return benchmark, rows


def _stats(row: dict, split: str, metric: str) -> tuple[float, float]:
    v = np.array([r["metrics"][split][metric] for r in row["seeds"]], dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fingerprints(row: dict) -> list:
    return [r["test_pred_sha256"] for r in row["seeds"]]


def compute_intervals(rows: dict[str, dict], label: np.ndarray, user: np.ndarray, replicates: int, seed: int) -> dict:
    """User-clustered CIs (pooled over seeds) and per-seed DeLong p of every row against R2LED,
    from the run folders' test_pred.npy; rows whose predictions are missing or do not match
    their recorded sha256 are left out."""
    boot = UserBootstrap(label, user, replicates=replicates, seed=seed)
    preds: dict[str, list[np.ndarray]] = {}
    for name, row in rows.items():
        loaded = []
        for r in row["seeds"]:
            path = Path(r["run"]) / "test_pred.npy"
            if r["test_pred_sha256"] is None or not path.is_file() or file_sha256(path) != r["test_pred_sha256"]:
                break
            p = np.load(path).astype(np.float64)
            if len(p) != len(label):
                break
            loaded.append(p)
        else:
            preds[name] = loaded
    out = {"replicates": int(replicates), "seed": int(seed), "level": CI_LEVEL, "reference": REFERENCE, "rows": {}}
    ref = preds.get(REFERENCE)
    for name, p in preds.items():
        entry: dict = {"test_pred_sha256": _fingerprints(rows[name])}
        if name == REFERENCE or ref is None:
            entry["auc_ci"] = list(percentile_ci(pooled_auc(boot, p)))
        else:
            entry.update(clustered_comparison(boot, ref, p))
            entry["reference_sha256"] = _fingerprints(rows[REFERENCE])
            ref_by_seed = {r["seed"]: x for r, x in zip(rows[REFERENCE]["seeds"], ref, strict=False)}
            entry["delong_p"] = [
                delong_test(label, ref_by_seed[r["seed"]], x)["p"]
                for r, x in zip(rows[name]["seeds"], p, strict=False)
                if r["seed"] in ref_by_seed
            ]
        out["rows"][name] = entry
    return out


def usable_intervals(recorded: dict | None, rows: dict[str, dict], replicates: int, seed: int) -> dict[str, dict]:
    """The recorded interval entries that still describe the rows: same draws, same predictions."""
    if not recorded or recorded.get("replicates") != replicates or recorded.get("seed") != seed:
        return {}
    ok = {}
    ref = _fingerprints(rows[REFERENCE]) if REFERENCE in rows else None
    for name, entry in recorded.get("rows", {}).items():
        if name not in rows or entry.get("test_pred_sha256") != _fingerprints(rows[name]):
            continue
        if name != REFERENCE and ref is not None and entry.get("reference_sha256") != ref:
            continue  # computed against other (or without) R2LED predictions
        ok[name] = entry
    return ok


def _verdict(entry: dict | None) -> str:
    if entry is None or "diff_ci" not in entry:
        return "—"
    lo, hi = entry["diff_ci"]
    return "R2LED ahead" if lo > 0 else "row ahead" if hi < 0 else "not separable"


def _ci(pair) -> str:
    return f"[{pair[0]:.4f}, {pair[1]:.4f}]"


def _pm(row: dict, split: str, metric: str) -> str:
    mean, std = _stats(row, split, metric)
    return f"{mean:.4f} ± {std:.4f}"


def render(benchmark: dict, rows: dict[str, dict], intervals: dict[str, dict], replicates: int, seed: int) -> str:
    """The markdown report; every figure comes from ``rows`` (the run JSON) or ``intervals``."""
    meta = benchmark.get("meta") or {}
    search = benchmark.get("search") or {}
    grid = benchmark.get("grid") or {}
    seeds = sorted({r["seed"] for row in rows.values() for r in row["seeds"]})
    lines = [
        f"# Accuracy on {meta.get('dataset', '?')} ({meta.get('test_rows', 0):,} test rows)",
        "",
        "Generated by `r2led bench report` from the JSON files beside this page "
        f"(`{meta.get('published', 'results')}/`); do not edit by hand.",
        f"Date {meta.get('date', '?')}; machine {meta.get('machine', '?')}; seeds {seeds}.",
        "",
        "How to read it:",
        "- **Equal search budget.** "
        + (
            f"Every model had the same {len(next(iter(grid['models'].values()))['trials'])} trials on seed 0, "
            "from one grid declared "
            f"before running (`configs/search.yaml`, sha256 {grid.get('sha256', '?')[:12]}): learning rate in "
            f"{{{', '.join(f'{v:g}' for v in grid['lr'])}}} x two knobs per model at two values each. "
            "The trial with the best valid AUC was chosen; the test split was not read by the search."
            if grid.get("models")
            else "No search was run: every model trained with the config files' settings."
        ),
        "- **R2LED's design was iterated on ml-1m's valid split** before this benchmark"
        + ("; its defaults were frozen before the search ran." if grid.get("models") else "."),
        "- **Test is read once**, for these tables.",
        f"- **Intervals respect users.** 95% CIs from a user-clustered bootstrap: {replicates:,} replicates, "
        f"seed {seed}; each replicate draws the test users with replacement and keeps all rows of a drawn user. "
        "A row's AUC is pooled over its seeds by averaging, in every replicate, the AUCs of its seeds on the same "
        "drawn users; the difference is R2LED's "
        "seed-mean AUC minus the row's, on the same draw. "
        '"R2LED ahead" only where the CI of the difference excludes 0, else "not separable".',
        "- **DeLong's p** treats rows as independent (per seed, R2LED's run against the row's run with the "
        "same seed; the largest p over seeds is shown). It is shown for reference; the claims use the clustered CI.",
        "",
    ]
    if search:
        lines += [
            "## Search on valid (seed 0)",
            "",
            "| model | knobs | why these knobs | trials | diverged | best valid AUC | worst valid AUC | chosen |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for model, rec in search.items():
            aucs = [t["valid_auc"] for t in rec["trials"] if t["valid_auc"] is not None]
            knobs = ", ".join(f"{k} {v}" for k, v in (grid.get("models", {}).get(model, {}).get("knobs") or {}).items())
            lines.append(
                f"| {model} | {knobs} | {rec.get('why', '')} | {len(rec['trials'])} "
                f"| {len(rec['trials']) - len(aucs)} | "
                f"{max(aucs):.4f} | {min(aucs):.4f} | {' '.join(rec['chosen'])} |"
            )
        lines.append("")
    for group, title in GROUPS:
        members = {k: v for k, v in rows.items() if v["group"] == group}
        if not members:
            continue
        lines += [
            f"## {title}",
            "",
            "| model | seeds | valid AUC | test AUC | 95% CI (users) | Δ AUC (R2LED − row) | 95% CI of Δ | verdict "
            "| DeLong p (max) | LogLoss | GAUC | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in members.items():
            e = intervals.get(name)
            ci = _ci(e["auc_ci"]) if e and "auc_ci" in e else "—"
            diff = f"{e['diff_vs_reference']:+.4f}" if e and "diff_vs_reference" in e else "—"
            dci = _ci(e["diff_ci"]) if e and "diff_ci" in e else "—"
            p = f"{max(e['delong_p']):.2g}" if e and e.get("delong_p") else "—"
            verdict = "reference" if name == REFERENCE else _verdict(e)
            train_s = np.mean([r["metrics"].get("train_seconds") or 0 for r in row["seeds"]])
            lines.append(
                f"| {name} | {len(row['seeds'])} | {_pm(row, 'valid', 'auc')} | {_pm(row, 'test', 'auc')} "
                f"| {ci} | {diff} | {dci} | "
                f"{verdict} | {p} | {_pm(row, 'test', 'logloss')} | {_pm(row, 'test', 'gauc')} | {train_s:.0f} |"
            )
        lines.append("")
    lines += _claims(rows, intervals)
    lines += [
        "## Every run",
        "",
        "| model | seed | overrides | valid AUC | test AUC | test LogLoss | test GAUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        for r in row["seeds"]:
            m = r["metrics"]
            lines.append(
                f"| {name} | {r['seed']} | {' '.join(r['overrides']) or '—'} | {m['valid']['auc']:.4f} "
                f"| {m['test']['auc']:.4f} | "
                f"{m['test']['logloss']:.4f} | {m['test']['gauc']:.4f} |"
            )
    lines.append("")
    return "\n".join(lines)


def _claims(rows: dict[str, dict], intervals: dict[str, dict]) -> list[str]:
    ahead, level, behind, missing = [], [], [], []
    for name in rows:
        if name == REFERENCE:
            continue
        e = intervals.get(name)
        v = _verdict(e)
        (
            ahead if v == "R2LED ahead" else behind if v == "row ahead" else level if v == "not separable" else missing
        ).append(name)
    out = ["## Claims (clustered 95% CI of R2LED − row, pooled over seeds)", ""]
    if REFERENCE not in rows:
        return out + ["No R2LED row: no claims.", ""]
    out.append(f"- R2LED is ahead of: {', '.join(ahead) or 'none'}.")
    out.append(f"- Not separable from R2LED: {', '.join(level) or 'none'}.")
    out.append(f"- Ahead of R2LED: {', '.join(behind) or 'none'}.")
    if missing:
        out.append(f"- No interval (predictions not available when the report was made): {', '.join(missing)}.")
    return out + [""]


def _test_rows(data: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(label, user) of the store's test rows, or None when the store is not there."""
    from r2led.data.store import LifelongStore

    if not (Path(data) / "manifest.json").is_file():
        return None
    store = LifelongStore(data)
    idx = store.split_indices("test")
    s = store.sample_arrays
    return s["label"][idx], s["user"][idx]


def write_report(
    folder: Path,
    markdown: Path | None = None,
    replicates: int | None = None,
    seed: int | None = None,
    data: Path | None = None,
) -> Path:
    """Regenerate the markdown report of a results folder (default ``<folder>.md``).

    Intervals are recomputed from the predictions when the data and every row's
    test_pred.npy are there, and then recorded in ``intervals.json``; otherwise the recorded
    ones are used where they still match. ``replicates`` / ``seed`` default to those of the
    recorded intervals (1,000 and 0 when there are none). Returns the markdown path.
    """
    folder = Path(folder)
    benchmark, rows = load_results(folder)
    markdown = Path(markdown) if markdown else folder.resolve().with_suffix(".md")
    recorded_file = folder / "intervals.json"
    recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else None
    # by default the draws the recorded intervals used (else 1,000 replicates, seed 0)
    replicates = replicates or (recorded or {}).get("replicates") or DEFAULT_REPLICATES
    seed = seed if seed is not None else (recorded or {}).get("seed", 0)
    intervals = usable_intervals(recorded, rows, replicates, seed)
    data = Path(data) if data else Path((benchmark.get("meta") or {}).get("data", ""))
    missing = [n for n in rows if n not in intervals]
    if missing and str(data) and (test := _test_rows(data)) is not None:
        fresh = compute_intervals(rows, *test, replicates=replicates, seed=seed)
        if fresh["rows"]:
            merged = {**intervals, **fresh["rows"]}
            intervals = merged
            write_json_atomic(recorded_file, {**{k: v for k, v in fresh.items() if k != "rows"}, "rows": merged})
    write_text_atomic(markdown, render(benchmark, rows, intervals, replicates, seed))
    return markdown
