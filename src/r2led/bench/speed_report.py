"""The speed benchmark's reports: the machine and command, the target checks, ``speed.json``,
``speed.md``, ``latency.png`` and the table in the terminal.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from r2led.bench.speed_measure import BATCH_PATH
from r2led.bench.speed_workload import REFERENCE


def machine_info(threads: int, load_before: tuple[float, float, float]) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def command_line(lengths, models, out, candidates, repeats, train_batch, items, seed, memory_limit_gb, time_limit_s) -> str:
    cmd = (
        f"r2led bench speed --lengths {','.join(map(str, lengths))} --models {','.join(models)} --out {out} "
        f"--candidates {candidates} --repeats {repeats} --train-batch {train_batch} --items {items} --seed {seed}"
    )
    if (memory_limit_gb, time_limit_s) != (8.0, 10.0):
        cmd += f"  (run_speed: memory_limit_gb={memory_limit_gb:g}, time_limit_s={time_limit_s:g})"
    return cmd


def _figure(results: dict, name: str, t: int, key: str) -> float | None:
    return results.get(name, {}).get(str(t), {}).get(key)


def target_checks(report: dict, candidates: int) -> list[dict]:
    """The targets of the speed issue, each with its measured ratio (None: not measurable)."""
    res, lengths = report["results"], report["settings"]["lengths"]
    p50 = lambda name, t: _figure(res, name, t, "latency_ms_p50")  # noqa: E731
    checks = []
    lo, hi = (100, 100_000) if {100, 100_000} <= set(lengths) else (min(lengths), max(lengths))
    a, b = p50(REFERENCE, hi), p50(REFERENCE, lo)
    ratio = a / b if a and b else None
    checks.append({
        "target": f"R2LED latency at T={hi:,} at most 3x its latency at T={lo:,}",
        "measured": f"{ratio:.2f}x ({a:.1f} ms vs {b:.1f} ms)" if ratio else "not measured",
        "passed": None if ratio is None else ratio <= 3.0,
    })  # fmt: skip
    t = 10_000 if 10_000 in lengths else None
    din, ref = (p50("din-long", t), p50(REFERENCE, t)) if t else (None, None)
    why = "" if t else " (T=10,000 not in the lengths)"
    if t and din is None and "din-long" in res:
        why = f" (din-long {res['din-long'][str(t)].get('skipped') or 'not measured'})"
    checks.append({
        "target": "at T=10,000 R2LED at least 20x faster than din-long",
        "measured": f"{din / ref:.1f}x ({din:.1f} ms vs {ref:.1f} ms)" if din and ref else "not measured" + why,
        "passed": None if not (din and ref) else din / ref >= 20.0,
    })  # fmt: skip
    for other in ("eta", "sim-hard"):
        ratios = {t: p50(REFERENCE, t) / p50(other, t) for t in lengths if p50(REFERENCE, t) and p50(other, t)}
        checks.append({
            "target": f"R2LED latency at most 1.5x {other}'s at every T",
            "measured": ", ".join(f"T={t:,}: {r:.2f}x" for t, r in ratios.items()) or f"not measured ({other} not run)",
            "passed": (all(r <= 1.5 for r in ratios.values()) and len(ratios) == len(lengths)) if ratios else None,
        })  # fmt: skip
    rc = report.get("retrieval_check")
    if rc:
        t, ctd, ct = rc["t"], rc["candidates_x_t_x_d"], rc["candidates_x_t"]
        retrieval, request = rc["largest_float_elements_retrieval"], rc["largest_float_elements_request"]
        peak = _figure(res, REFERENCE, t, "peak_mb")
        checks.append({
            "target": "no (candidates, T, d) float tensor built by R2LED's retrieval",
            "measured": (
                f"T={t:,}: largest float tensor {retrieval:,} elements in the retrieval ({retrieval / ct:.2g} per "
                f"(candidate, behaviour) pair), {request:,} in the whole request, vs {ctd:,} in one (candidates, T, d) "
                f"tensor; request peak {peak:,.1f} MB vs {ctd * 4 / 2**20:,.1f} MB for that tensor in float32"
            ),
            "passed": retrieval < ctd,
        })  # fmt: skip
    return checks


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def _cell(value: float | None, ref: float | None, fmt: str, skipped: str | None) -> str:
    if value is None:
        if skipped:
            return "not run (memory)" if "GB" in skipped or "memory" in skipped else "not run (time)" if " s " in skipped else "not run"
        return "—"
    text = format(value, fmt)
    return f"{text} ({value / ref:.2f}x)" if ref else text


def _table(report: dict, key: str, fmt: str, skipped_key: str) -> list[str]:
    res, lengths = report["results"], report["settings"]["lengths"]
    lines = ["| model | " + " | ".join(f"T={t:,}" for t in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name, per_t in res.items():
        cells = []
        for t in lengths:
            e = per_t.get(str(t), {})
            ref = _figure(res, REFERENCE, t, key)
            cells.append(_cell(e.get(key), ref, fmt, e.get(skipped_key)))
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def speed_markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    ref_cfg = s["model_configs"].get(REFERENCE, {})
    lines = [
        "# Speed: R2LED against the lifelong baselines",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['platform']}",
        f"- software: torch {m['torch']}, numpy {m['numpy']}, Python {m['python']}; torch threads {m['torch_threads']}, "
        f"OMP_WAIT_POLICY {m['omp_wait_policy']}",
        f"- load average (1, 5, 15 min) before: {m['load_average_before']}, after: {m['load_average_after']}",
        f"- data: synthetic catalogue of {s['items']:,} items, 3-level SIDs ({' x '.join(map(str, s['sid_codebooks']))}) "
        "from a hidden topic hierarchy; histories Zipf-skewed within 3 topics per user, 10 % exploration",
        "- mean distinct items per request history: "
        + ", ".join(f"T={int(t):,}: {d['mean_distinct_items']:,.0f}" for t, d in report["data"].items()),
        f"- models: d = 32, short window 20; R2LED k = {ref_cfg.get('k', 20)} x 3 routes, rho = {ref_cfg.get('rho', 0.75)}; "
        "baselines with a retrieval budget keep k = 60",
        f"- serving: one request = one history of length T x {s['candidates']} candidates (the history shared by the "
        f"candidate rows as an expand-ed view), eval mode, no_grad, per-item caches warm; {s['warmup']} warm-up requests, "
        f"then median and p95 over {s['repeats']} requests of different users; each timed round makes one request "
        "for every (model, T) pair (T ascending, models shuffled within a T), so load changes hit all alike",
        f"- training: forward + backward + Adam on {s['train_batch']} samples with their own histories; a warm-up step, "
        f"then the median of {s['train_steps']} steps",
        "- peak memory: the extra bytes torch allocates during one request (one training step), from torch.profiler's "
        "allocation events (profile_memory=True) on an untimed call, plus the peak of numpy and Python allocations "
        "(tracemalloc) in the same call; parameters, optimizer state, caches and inputs exist before and are not counted",
        f"- limits: a run is not started when its memory or time, extrapolated linearly in T from the previous length, "
        f"exceeds {s['memory_limit_gb']:g} GB or {s['time_limit_s']:g} s per call; reasons are listed below",
        "",
        "Every figure is followed by its ratio to R2LED at the same T (model / R2LED): above 1 the model is slower "
        "or bigger, except for throughput, where above 1 it is faster.",
        "",
        "## Serving latency, median (ms per request)",
        "",
        *_table(report, "latency_ms_p50", ".1f", "serve_skipped"),
        "",
        "## Serving latency, p95 (ms per request)",
        "",
        *_table(report, "latency_ms_p95", ".1f", "serve_skipped"),
        "",
        "## Serving CPU time, median (ms per request, all threads)",
        "",
        *_table(report, "cpu_ms_p50", ".1f", "serve_skipped"),
        "",
        "## Training throughput (samples/s)",
        "",
        *_table(report, "train_samples_per_s", ",.0f", "train_skipped"),
        "",
        "## Peak memory of one request (MB)",
        "",
        *_table(report, "peak_mb", ",.1f", "serve_skipped"),
        "",
        "## Peak memory of one training step (MB)",
        "",
        *_table(report, "train_peak_mb", ",.1f", "train_skipped"),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for c in report["checks"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[c["passed"]]
        lines.append(f"| {c['target']} | {c['measured']} | {met} |")
    reasons = [
        f"- {name}, T={int(t):,}: {e['skipped']}" for name, per_t in report["results"].items() for t, e in per_t.items() if e.get("skipped")
    ]
    notes = [f"- {name}, T={int(t):,}: {n}" for name, per_t in report["results"].items() for t, e in per_t.items() for n in e.get("notes", [])]
    copied = [f"{name}" for name, per_t in report["results"].items() if any(e.get("history_input") == "copied" for e in per_t.values())]
    lines += ["", "## Not run, and why", "", *(reasons or ["- every model ran at every length"])]
    if notes:
        lines += ["", "## Stopped early", "", *notes]
    lines += ["", "## Notes", ""]
    if copied:
        lines.append(f"- history copied once per candidate row (the model cannot take a shared view, or on purpose): {', '.join(copied)}")
    if BATCH_PATH in report["results"]:
        lines.append(
            f"- `{BATCH_PATH}` is the same R2LED model given the history copied per candidate, so that its retrieval "
            "scores every (candidate, behaviour) pair as in training: it shows what the shared-history serving path "
            "(`R2LED.serve` with `R2LED.retrieve_routes_shared`, the same scores) buys."
        )
    lines.append("- latency is wall-clock time on a machine shared with other work: see the load averages above; the "
                 "CPU-time table is less sensitive to it.")
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out: Path) -> None:
    from r2led.bench.plots import line_plot

    _write_json(report, out / "speed.json")
    tmp = out / f".speed.md.tmp-{os.getpid()}"
    tmp.write_text(speed_markdown(report))
    tmp.replace(out / "speed.md")
    series = {}
    for name, per_t in report["results"].items():
        series[name] = [(int(t), e["latency_ms_p50"]) for t, e in per_t.items() if e.get("latency_ms_p50") is not None]
    m, s = report["machine"], report["settings"]
    line_plot(
        series,
        out / "latency.png",
        xlabel="history length T",
        ylabel=f"serving latency per request, median (ms), {s['candidates']} candidates",
        title="Serving latency against history length",
        logx=True,
        logy=True,
        highlight=REFERENCE,
        notes=[f"{m['cpu']}, torch {m['torch']}, {m['torch_threads']} threads; {report['date']}", "missing points: not run (see speed.md)"],
    )


def print_summary(report: dict, console: Console) -> None:
    res, lengths = report["results"], report["settings"]["lengths"]
    table = Table(title="Serving latency p50 (ms) and training throughput (samples/s); (x R2LED)", title_justify="left")
    table.add_column("model")
    for t in lengths:
        table.add_column(f"T={t:,}", justify="right")
    for name, per_t in res.items():
        row = []
        for t in lengths:
            e = per_t.get(str(t), {})
            lat = _cell(e.get("latency_ms_p50"), _figure(res, REFERENCE, t, "latency_ms_p50"), ".1f", e.get("serve_skipped"))
            thr = _cell(e.get("train_samples_per_s"), _figure(res, REFERENCE, t, "train_samples_per_s"), ",.0f", e.get("train_skipped"))
            row.append(f"{lat}\n{thr}" if e.get("train_samples_per_s") is not None or e.get("train_skipped") else lat)
        table.add_row(name, *row)
    console.print(table)
    for c in report["checks"]:
        mark = {True: "[green]met[/]", False: "[red]NOT met[/]", None: "[yellow]not measured[/]"}[c["passed"]]
        console.print(f"{mark}  {c['target']}: {c['measured']}")
