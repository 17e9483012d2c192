"""The speed benchmark's reports: the machine and command, the headline ratios, ``speed.json``,
``speed.md`` (a result document: what was measured and how, tables, the plot), ``latency.png``
and the table in the terminal. A report prints figures and ratios; it grades nothing.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from r2led.atomic import write_json_atomic
from r2led.bench.speed_measure import FLOOR
from r2led.bench.speed_workload import REFERENCE, VARIANTS, r2led_floor_name


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


def command_line(settings: dict, out) -> str:
    """The ``r2led bench speed`` command that reproduces a run, from its ``report["settings"]``."""
    s = settings
    cmd = (
        f"r2led bench speed --lengths {','.join(map(str, s['lengths']))} --models {','.join(s['models'])} "
        f"--out {out} --candidates {s['candidates']} --repeats {s['repeats']} --train-batch {s['train_batch']} "
        f"--items {s['items']} --seed {s['seed']} --strawman '{','.join(s['strawman'])}' "
        f"--strawman-max-t {s['strawman_max_t']} --threads {s.get('threads', 2)}"
    )
    if (s["memory_limit_gb"], s["time_limit_s"]) != (8.0, 10.0):
        cmd += f"  (run_speed: memory_limit_gb={s['memory_limit_gb']:g}, time_limit_s={s['time_limit_s']:g})"
    return cmd


def _figure(results: dict, name: str, t: int, key: str) -> float | None:
    return results.get(name, {}).get(str(t), {}).get(key)


def r2led_names(report: dict) -> list[str]:
    """The R2LED contenders of a run (warm): the default config first, then its variants."""
    return [n for n in report["results"] if n == REFERENCE or n in VARIANTS]


def headline(report: dict) -> list[dict]:
    """The comparisons the benchmark exists for, per R2LED encoder and T, as plain ratios
    (no verdicts): warm CPU time against warm SIM-hard and ETA, against its own at the
    shortest T, against its floor; its floor against SIM-hard (what no retrieval or glue code
    could bring it under); cold against warm; training samples/s against SIM-hard's."""
    res, lengths = report["results"], report["settings"]["lengths"]
    cpu = lambda name, t: _figure(res, name, t, "cpu_ms_p50")  # noqa: E731
    p50 = lambda name, t: _figure(res, name, t, "latency_ms_p50")  # noqa: E731
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    t0 = lengths[0]
    rows = []
    for name in r2led_names(report):
        for t in lengths:
            rows.append({
                "model": name,
                "t": t,
                "r2led_cpu_ms": cpu(name, t),
                "vs_sim_hard": ratio(cpu(name, t), cpu("sim-hard", t)),
                "vs_eta": ratio(cpu(name, t), cpu("eta", t)),
                "p50_vs_shortest": ratio(p50(name, t), p50(name, t0)),
                "cpu_vs_shortest": ratio(cpu(name, t), cpu(name, t0)),
                "vs_floor": ratio(cpu(name, t), cpu(r2led_floor_name(name), t)),
                "floor_vs_sim_hard": ratio(cpu(r2led_floor_name(name), t), cpu("sim-hard", t)),
                "cold_vs_warm": ratio(cpu(f"{name} (cold)", t), cpu(name, t)),
                "train_vs_sim_hard": ratio(
                    _figure(res, name, t, "train_samples_per_s"), _figure(res, "sim-hard", t, "train_samples_per_s")
                ),
            })  # fmt: skip
    return rows


def _write_json(obj: dict, path: Path) -> None:
    write_json_atomic(path, obj, default=float)


def _cell(value: float | None, ref: float | None, fmt: str, skipped: str | None) -> str:
    if value is None:
        if skipped:
            return (
                "not run (memory)"
                if "GB" in skipped or "memory" in skipped
                else "not run (time)"
                if " s " in skipped
                else "not run"
            )
        return "—"
    text = format(value, fmt)
    return f"{text} ({value / ref:.2f}x)" if ref else text


def _table(report: dict, key: str, fmt: str, skipped_key: str, ref_name: str = REFERENCE, names=None) -> list[str]:
    res, lengths = report["results"], report["settings"]["lengths"]
    lines = ["| model | " + " | ".join(f"T={t:,}" for t in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name in names or res:
        per_t = res.get(name, {})
        cells = []
        for t in lengths:
            e = per_t.get(str(t), {})
            cells.append(
                _cell(e.get(key), _figure(res, ref_name, t, key) if ref_name else None, fmt, e.get(skipped_key))
            )
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _by_mode(report: dict, mode: str) -> list[str]:
    return [n for n, per_t in report["results"].items() if any(e.get("mode") == mode for e in per_t.values())]


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "—"


def speed_markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    ref_cfg = s["model_configs"].get(REFERENCE, {})
    warm, cold, batch = _by_mode(report, "warm"), _by_mode(report, "cold"), _by_mode(report, "batch")
    floors = _by_mode(report, "floor")
    lines = [
        "# Speed: R2LED against the lifelong baselines",
        "",
        "![serving CPU time per request against history length](latency.png)",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['platform']}",
        f"- software: torch {m['torch']}, numpy {m['numpy']}, Python {m['python']}; "
        f"torch threads {m['torch_threads']}, OMP_WAIT_POLICY {m['omp_wait_policy']}",
        f"- load average (1, 5, 15 min) before: {m['load_average_before']}, after: {m['load_average_after']}",
        f"- data: synthetic catalogue of {s['items']:,} items, "
        f"3-level SIDs ({' x '.join(map(str, s['sid_codebooks']))}) from a hidden topic hierarchy; "
        "histories Zipf-skewed within 3 topics per user, 10 % exploration",
        "- mean distinct items per request history: "
        + ", ".join(f"T={int(t):,}: {d['mean_distinct_items']:,.0f}" for t, d in report["data"].items()),
        f"- models: d = 32, short window 20; R2LED k = {ref_cfg.get('k', 20)} x 3 routes, "
        f"rho = {ref_cfg.get('rho', 0.75)}; baselines with a retrieval budget keep k = 60",
        "",
        "## What is measured",
        "",
        f"A request scores {s['candidates']} candidates for one user whose history has T behaviours. Every model "
        "serves through its request API (`model.score_request(state, candidates)`, `r2led.models.user_state`), "
        "its best honest path:",
        "",
        "- **warm** (the model's name): the user state was built before the request and is kept, as a server keeps "
        "it and updates it on append. R2LED and ETA: the history by distinct item (each item's positions grouped, "
        "most recent first, plus chains for the appended ones) with packed SimHash signatures, scanned by the same "
        "compiled kernel (ETA with no semantic view); SIM-hard: category -> positions (its user behaviour tree); "
        "TWIN: `W_k x_h` per behaviour; SIM-soft: retrieval embeddings per behaviour; SDIM: per hash round and code, "
        "the count and sum of the colliding behaviours' embeddings; AvgPool: the running sum; DIN: the last 30 "
        "behaviours; din-long: every behaviour. Every model with multi-head target attention (SIM, ETA, TWIN, SDIM, "
        "AvgPool's short route, `r2led[mha]`) reads its keys' and values' projections from per-item tables kept "
        "in eval mode, and projects the short window once per request, not once per candidate.",
        "- **cold** (`(cold)`): the same, with the user state built inside the timed request from the raw history.",
        f"- **strawman** (`(batch path)`): the training/evaluation batch path on C rows sharing one history "
        f"(an `expand`-ed view), which is how this benchmark served every model before the request API; up to "
        f"T={s.get('strawman_max_t', 100_000):,}.",
        "- **floor** (`floor` for `r2led`, `floor[mha]` for `r2led[mha]`...): that R2LED's unavoidable work timed "
        "alone: one (vectorised) popcount pass of every candidate over the user's distinct items' signatures, plus the "
        "refinement's dense products (its encoder over the 60 route slots and the short window, route fusion, head) "
        "on inputs gathered beforehand.",
        "- **`r2led[lsh]`**: the default config served with the approximate collaborative index "
        "(`R2LED.collaborative_bands = 8`, banded LSH over the packed signatures); its floor is the exact one's.",
        "- **R2LED's encoders**: `r2led` is the default config; `r2led[din]` / `r2led[mha]` the same model with DIN's "
        "activation unit or multi-head dot-product attention as the per-route encoder. Both serve from per-item "
        "tables kept as a server keeps them (fused items; for multi-head attention also their key and value "
        "projections); every baseline with target attention keeps the same per-item projections.",
        "",
        f"Each request: eval mode, `torch.inference_mode`, per-item caches warm; {s['warmup']} warm-up requests, then "
        f"median and p95 over {s['repeats']} requests of different users (at long T the users repeat: at most "
        "4,000,000 behaviours are held per length). Each timed round makes one request for every (model, mode, T) "
        "(T ascending, shuffled within a T): one process, interleaved, so load changes hit all alike. CPU time is "
        "the process's CPU time per request (all threads); wall time is also given. Training: forward + backward + "
        f"Adam on {s['train_batch']} samples with their own histories, median of {s['train_steps']} steps after a "
        "warm-up step, the same batches for every model. Peak memory: the extra bytes one request allocates "
        "(torch.profiler's allocation events plus numpy/Python via tracemalloc); state: one user's kept state with "
        f"the model's index. Limits: a run is not started when its memory (states included) or time, extrapolated "
        f"linearly in T from the previous length, exceeds {s['memory_limit_gb']:g} GB or "
        f"{s['time_limit_s']:g} s per call.",
        "",
        "## Headline ratios (CPU time per request, warm)",
        "",
        "| T | model | CPU ms | / SIM-hard | / ETA | / itself at shortest T (wall p50; CPU) | / its floor "
        "| its floor / SIM-hard | cold / warm | training samples/s / SIM-hard's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in sorted(headline(report), key=lambda h: h["t"]):
        ms = f"{h['r2led_cpu_ms']:.2f}" if h["r2led_cpu_ms"] else "—"
        lines.append(
            f"| {h['t']:,} | {h['model']} | {ms} | {_ratio(h['vs_sim_hard'])} | {_ratio(h['vs_eta'])} | "
            f"{_ratio(h['p50_vs_shortest'])}; {_ratio(h['cpu_vs_shortest'])} | "
            f"{_ratio(h['vs_floor'])} | {_ratio(h['floor_vs_sim_hard'])} | {_ratio(h['cold_vs_warm'])} | "
            f"{_ratio(h['train_vs_sim_hard'])} |"
        )
    lines += [
        "",
        "In the tables below every figure is followed by its ratio to warm R2LED at the same T (model / R2LED): "
        "above 1 the model is slower or bigger; in the training table the ratio is to SIM-hard's samples/s.",
        "",
        "## Serving CPU time, median (ms per request), warm",
        "",
        *_table(report, "cpu_ms_p50", ".2f", "serve_skipped", names=warm + floors),
        "",
        "## Serving CPU time, median (ms per request), cold",
        "",
        *_table(report, "cpu_ms_p50", ".2f", "serve_skipped", names=cold),
        "",
        "## Serving CPU time, median (ms per request), strawman batch path",
        "",
        *_table(report, "cpu_ms_p50", ".2f", "serve_skipped", names=batch),
        "",
        "## Serving wall time, median (ms per request)",
        "",
        *_table(report, "latency_ms_p50", ".2f", "serve_skipped", names=warm + cold + batch + floors),
        "",
        "## Serving wall time, p95 (ms per request)",
        "",
        *_table(report, "latency_ms_p95", ".2f", "serve_skipped", names=warm + cold + batch + floors),
        "",
        "## Ratio to the default R2LED's floor (`floor`; each encoder's own floor is in the headline table; "
        "CPU time, warm)",
        "",
        *_table(report, "cpu_ms_p50", ".2f", "serve_skipped", ref_name=FLOOR, names=warm),
        "",
        "## Training throughput (samples/s; ratio to SIM-hard)",
        "",
        *_table(report, "train_samples_per_s", ",.0f", "train_skipped", ref_name="sim-hard", names=warm),
        "",
        "## One user's kept state (MB), warm",
        "",
        *_table(report, "state_mb", ",.2f", "serve_skipped", names=warm),
        "",
        "## One append to a kept state (µs, median of 200; the model's index updated)",
        "",
        *_table(report, "append_us", ",.1f", "serve_skipped", names=warm),
        "",
        "## Peak memory of one request (MB)",
        "",
        *_table(report, "peak_mb", ",.2f", "serve_skipped", names=warm + cold),
        "",
        "## Peak memory of one training step (MB)",
        "",
        *_table(report, "train_peak_mb", ",.1f", "train_skipped", names=warm),
    ]
    rc = report.get("retrieval_check")
    if rc:
        lines += [
            "",
            "## Float tensors in R2LED's request",
            "",
            f"At T={rc['t']:,}, the largest float tensor built by R2LED's request retrieval has "
            f"{rc['largest_float_elements_retrieval']:,} elements, and {rc['largest_float_elements_request']:,} in the "
            f"whole request; one (candidates, T, d) tensor would have {rc['candidates_x_t_x_d']:,}.",
        ]
    recall = report.get("collaborative_recall")
    if recall:
        lengths = report["settings"]["lengths"]
        lines += [
            "",
            "## Approximate collaborative index: recall against exact search",
            "",
            "Share of the behaviours the exact routes take that the banded index's routes take too (same candidate), "
            "mean over the first 5 requests per T. The semantic view stays exact.",
            "",
            "| model | bands | " + " | ".join(f"T={t:,}" for t in lengths) + " |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for name, r in recall.items():
            cells = [f"{r['recall'][str(t)]:.4f}" if str(t) in r["recall"] else "—" for t in lengths]
            lines.append(f"| {name} | {r['bands']} | " + " | ".join(cells) + " |")
    reasons = [
        f"- {name}, T={int(t):,}: {e['skipped']}"
        for name, per_t in report["results"].items()
        for t, e in per_t.items()
        if e.get("skipped")
    ]
    notes = [
        f"- {name}, T={int(t):,}: {n}"
        for name, per_t in report["results"].items()
        for t, e in per_t.items()
        for n in e.get("notes", [])
    ]
    lines += ["", "## Not run, and why", "", *(reasons or ["- every model ran at every length"])]
    if notes:
        lines += ["", "## Stopped early", "", *notes]
    lines += [
        "",
        "## Caveats",
        "",
        f"- The machine was shared with other work (load averages above, for {m['cores_usable']} usable cores). "
        "Every figure comes from one process with interleaved rounds, so load hits all contenders alike; CPU time "
        "is less sensitive to it than wall time, but single figures move by 10-30 % between runs. Compare ratios.",
        f"- CPU time is measured at {m['torch_threads']} torch intra-op thread(s) (`--threads`; `r2led serve` runs 1 "
        "per worker by default). More threads add wake-ups to every small operation, which costs the models made "
        "of small operations (SIM-hard, ETA) relatively more: the ratios change with the thread count.",
        "- R2LED with DIN's activation unit runs an MLP per (candidate, behaviour) pair over its 60 route slots and "
        "the 20-behaviour short window; that costs more than the dot-product attention SIM-hard, ETA and TWIN run "
        "over their 60 + 20, and at short histories it is most of a request: the floor alone (no retrieval logic, "
        "no gathering) is the headline's 'its floor / SIM-hard'. `r2led[mha]` shows the same method with "
        "dot-product attention.",
        "- R2LED's and ETA's per-candidate retrieval cost follows the number of distinct items in the history "
        "(bounded by the catalogue: at most 20,000 here), not its length; SIM-hard's follows k. With a catalogue "
        "of millions and very diverse histories the warm cost of R2LED and ETA grows with the distinct items.",
        "- The collaborative view of `r2led` and `r2led[mha]` is exact (every distinct item's signature is scanned); "
        "`r2led[lsh]` scores only the items that share one of 8 signature bands (8 bits each) with the candidate, "
        "besides its semantic run: its recall is in the table above. On this catalogue's untrained (random) "
        "signatures the nearest items are far apart in Hamming distance, which is the hard case for banded LSH.",
        "- Synthetic data: a hidden topic hierarchy with Zipf popularity; real histories repeat items differently.",
        "- Training throughput is measured on synthetic batches of the stated size and length (up to T=100,000), "
        "not on a real dataset's batches.",
        "- Every model's per-item tables (R2LED's fused items, the baselines' item embeddings with side features) are "
        "kept in eval mode, as a server keeps them; the first request after a parameter change rebuilds them.",
    ]
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out: Path) -> None:
    _write_json(report, out / "speed.json")
    tmp = out / f".speed.md.tmp-{os.getpid()}"
    tmp.write_text(speed_markdown(report))
    tmp.replace(out / "speed.md")
    latency_plot(report, out / "latency.png")


def latency_plot(report: dict, path: Path) -> None:
    """Log-log CPU time per request against T: one colour per model, warm solid, cold dashed,
    the strawman dotted, the floor black."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res, m, s = report["results"], report["machine"], report["settings"]
    fig = Figure(figsize=(8.5, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = {}
    palette = [f"C{i}" for i in range(10)]
    for name, per_t in res.items():
        points = [(int(t), e["cpu_ms_p50"]) for t, e in per_t.items() if e.get("cpu_ms_p50") is not None]
        if not points:
            continue
        mode = next((e.get("mode") for e in per_t.values() if e.get("mode")), "warm")
        base = name.split(" (")[0]
        colour = (
            ("black" if name == FLOOR else "dimgrey")
            if mode == "floor"
            else colours.setdefault(base, palette[len(colours) % len(palette)])
        )
        style = {"warm": "-", "cold": "--", "batch": ":", "floor": "-."}.get(mode, "-")
        width = 2.6 if base == REFERENCE or base in VARIANTS else 1.3
        ax.plot(*zip(*points, strict=False), style, color=colour, marker="o", markersize=3, linewidth=width, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("history length T")
    ax.set_ylabel(f"CPU time per request, median (ms), {s['candidates']} candidates")
    ax.set_title("Serving cost against history length (warm solid, cold dashed, batch path dotted)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.text(
        0.01, 0.0, f"{m['cpu']}, torch {m['torch']}, torch threads {m['torch_threads']}; {report['date']}", fontsize=7
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def print_summary(report: dict, console: Console) -> None:
    res, lengths = report["results"], report["settings"]["lengths"]
    table = Table(
        title="Serving CPU time p50 (ms) and training throughput (samples/s); (x warm R2LED)", title_justify="left"
    )
    table.add_column("model")
    for t in lengths:
        table.add_column(f"T={t:,}", justify="right")
    for name, per_t in res.items():
        row = []
        for t in lengths:
            e = per_t.get(str(t), {})
            cpu = _cell(e.get("cpu_ms_p50"), _figure(res, REFERENCE, t, "cpu_ms_p50"), ".2f", e.get("serve_skipped"))
            thr = _cell(
                e.get("train_samples_per_s"),
                _figure(res, REFERENCE, t, "train_samples_per_s"),
                ",.0f",
                e.get("train_skipped"),
            )
            row.append(f"{cpu}\n{thr}" if e.get("train_samples_per_s") is not None else cpu)
        table.add_row(escape(name), *row)  # escape: rich would read r2led[mha]'s [mha] as a style tag
    console.print(table)
    console.print(
        "R2LED (warm) per T: CPU ms; / SIM-hard; / ETA; wall p50 / p50 at shortest T; CPU / CPU at shortest T; "
        "/ its floor; its floor / SIM-hard; cold / warm; training / SIM-hard"
    )
    for h in headline(report):
        ms = f"{h['r2led_cpu_ms']:.2f}" if h["r2led_cpu_ms"] else "—"
        console.print(
            f"  {escape(h['model'])}, T={h['t']:,}: {ms} ms; {_ratio(h['vs_sim_hard'])}; {_ratio(h['vs_eta'])}; "
            f"{_ratio(h['p50_vs_shortest'])}; {_ratio(h['cpu_vs_shortest'])}; "
            f"{_ratio(h['vs_floor'])}; {_ratio(h['floor_vs_sim_hard'])}; {_ratio(h['cold_vs_warm'])}; "
            f"{_ratio(h['train_vs_sim_hard'])}"
        )
