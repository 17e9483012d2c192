"""Why a trained R2LED scores what it scores: retrieval, gate and tail-item diagnostics.

``r2led bench diagnose RUN [--compare RUN ...] --out DIR`` reads finished run folders and writes
``diagnostics.json`` and ``diagnostics.md``:

- **retrieval** (RUN, and every --compare run that is an R2LED): per route, the share of its
  slots that are filled, that hold a semantic match (the behaviour's prefix at the route's
  level equals the target's) and that are *relevant*: the behaviour's item shares a tag (on
  MovieLens a genre) with the target. Also the distinct behaviours per sample over all
  routes: routes that retrieve the same behaviours spend the attention budget twice. The
  short-term window is given as the reference an unretrieved selection reaches.
- **gate**: the mean SID-level fusion weights over [ID, level 1 … L] of the catalogue's
  items, by popularity bucket: a tail item is expected to lean on its SID levels.
- **tail**: AUC on the split's rows by the target item's popularity (equal-sized buckets of
  rows), for every run, with DeLong's p of RUN against each --compare run inside each bucket.

The split is **valid** by default: these analyses guide design, and the test split is read
once, for the final tables (``--split test`` only for those). The buckets and the split come
from ``configs/analysis.yaml``, fixed before results are computed; "the tail" is its
``tail_bucket`` (the least-seen targets). Valid predictions are computed from the run's best
checkpoint; test ones are read from ``test_pred.npy``.

An item's popularity is its number of training samples (rows of the train split with it as
the target); valid and test rows are not counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.metrics import roc_auc_score

from r2led.atomic import write_json_atomic, write_text_atomic
from r2led.bench.significance import delong_test
from r2led.data.batches import BatchIterator
from r2led.data.store import LifelongStore
from r2led.errors import DataError
from r2led.models.base import short_window
from r2led.models.layers import gather_behaviours
from r2led.train.trainer import load_run, predict

ANALYSIS = Path(__file__).resolve().parent.parent / "configs" / "analysis.yaml"
SPLITS = ("valid", "test")


def analysis_settings(path: Path | None = None) -> dict:
    """The declared analysis slices: split, popularity_buckets, tail_bucket, retrieval_every."""
    spec = yaml.safe_load(Path(path or ANALYSIS).read_text())
    if spec.get("split") not in SPLITS or int(spec.get("popularity_buckets", 0)) < 1:
        raise DataError(f"{path or ANALYSIS}: expected split in {SPLITS} and popularity_buckets >= 1")
    return spec


def item_popularity(store: LifelongStore) -> np.ndarray:
    """(N+1,) training samples per item (row 0, padding, is 0)."""
    s = store.sample_arrays
    return np.bincount(s["target"][store.split_indices("train")], minlength=store.n_items + 1)


def popularity_buckets(popularity: np.ndarray, n: int) -> tuple[np.ndarray, list[str]]:
    """Bucket each row by popularity into at most ``n`` groups of about equal size.

    Returns the bucket of each row and labels such as ``"50-199"`` (training samples of the
    target). Ties stay together, so heavy ties give fewer, unequal buckets.
    """
    low = int(popularity.min(initial=0))
    edges = np.unique(np.quantile(popularity, np.linspace(0, 1, n + 1)[1:-1], method="higher"))
    edges = edges[edges > low]  # each bucket starts at its lowest count
    bucket = np.searchsorted(edges, popularity, side="right")
    bounds = [low, *edges.astype(int).tolist(), int(popularity.max(initial=0)) + 1]
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(bounds[:-1], bounds[1:], strict=False)]
    return bucket, labels


def relevant_to_target(tags: torch.Tensor, target: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """items (B, ...) share a non-zero tag with target (B,): (B, ...) bool."""
    t = tags[target].view(target.shape[0], *([1] * (items.dim() - 1)), 1, -1)  # (B, 1.., 1, G)
    h = tags[items].unsqueeze(-1)  # (B, ..., G, 1)
    return ((h == t) & (h > 0)).flatten(-2).any(-1)


def _item_tags(store: LifelongStore) -> torch.Tensor:
    """(N+1, G) tags per item; the category when the data has no tags."""
    tags = store.item_tags if int(store.manifest.get("max_tags", 0)) else store.item_category[:, None]
    return torch.from_numpy(np.ascontiguousarray(tags))


@torch.no_grad()
def retrieval_stats(
    model, store: LifelongStore, split: str = "test", every: int = 10, batch_size: int = 1024, t_max: int = 2048
) -> dict:
    """Per-route fill, match and relevance rates of ``model.retrieve_routes`` on every
    ``every``-th sample of ``split``; see the module docstring."""
    model.eval()
    tags = _item_tags(store)
    idx = store.split_indices(split)[::every]
    sums: dict[str, torch.Tensor | float] = {}

    def add(name: str, value) -> None:
        sums[name] = sums.get(name, 0) + value

    for batch in BatchIterator(store, idx, batch_size, t_max):
        index, taken = model.retrieve_routes(batch.target, batch.hist_items, batch.hist_mask)  # (B, R, k)
        b, r, k = index.shape
        items = gather_behaviours(batch.hist_items, index) * taken
        add("samples", b)
        add("filled", taken.sum((0, 2)).double())
        add("relevant", (relevant_to_target(tags, batch.target, items) & taken).sum((0, 2)).double())
        if getattr(model, "use_sid", False):
            tokens = model.route_tokens  # (N+1, R)
            match = torch.stack([tokens[items[:, j], j] == tokens[batch.target, j].unsqueeze(1) for j in range(r)], 1)
            add("matched", (match & taken).sum((0, 2)).double())
        # distinct behaviours over all routes: sort each sample's taken positions
        flat = torch.where(taken, index, -1).view(b, -1).sort(-1).values
        fresh = torch.ones_like(flat, dtype=torch.bool)
        fresh[:, 1:] = flat[:, 1:] != flat[:, :-1]
        add("distinct", float((fresh & (flat >= 0)).sum()))
        add("slots", float(taken.sum()))
        s_items, _, s_mask = short_window(batch, model.cfg.short_len)
        add("short_filled", float(s_mask.sum()))
        add("short_relevant", float((relevant_to_target(tags, batch.target, s_items) & s_mask).sum()))
    n = sums["samples"]
    filled = sums["filled"]
    routes = []
    for j in range(len(filled)):
        f = float(filled[j])
        routes.append(
            {
                "level": int(model.route_levels[j]) + 1 if getattr(model, "use_sid", False) else None,
                "filled_per_sample": f / n,
                "match_share": float(sums["matched"][j]) / f if "matched" in sums and f else 0.0,
                "relevant_share": float(sums["relevant"][j]) / f if f else 0.0,
            }
        )
    return {
        "split": split,
        "samples": int(n),
        "routes": routes,
        "slots_per_sample": sums["slots"] / n,
        "distinct_per_sample": sums["distinct"] / n,
        "short_relevant_share": sums["short_relevant"] / max(sums["short_filled"], 1.0),
        "relevance": "shares a tag with the target"
        if int(store.manifest.get("max_tags", 0))
        else "same category as the target",
    }


@torch.no_grad()
def gate_stats(model, popularity: np.ndarray, n_buckets: int = 5) -> dict | None:
    """Mean gate weights over [ID, level 1..L] of catalogue items by popularity bucket
    (None when the model has no gate)."""
    gate_weights = getattr(model, "gate_weights", None)
    items = torch.arange(1, len(popularity))
    weights = gate_weights(items) if gate_weights is not None else None
    if weights is None:
        return None
    bucket, labels = popularity_buckets(popularity[1:], n_buckets)
    weights = weights.double().numpy()
    rows = [
        {
            "popularity": label,
            "items": int((bucket == i).sum()),
            "weights": weights[bucket == i].mean(0).round(4).tolist(),
        }
        for i, label in enumerate(labels)
        if (bucket == i).any()
    ]
    return {"views": ["id", *[f"level {j + 1}" for j in range(weights.shape[1] - 1)]], "buckets": rows}


def tail_auc(
    store: LifelongStore, preds: dict[str, np.ndarray], popularity: np.ndarray, n_buckets: int = 5, split: str = "test"
) -> dict:
    """AUC on ``split`` by target popularity for each run (the first is the reference for
    DeLong's p); preds: each run's probabilities on the split's rows, in split order."""
    s = store.sample_arrays
    test = store.split_indices(split)
    label = s["label"][test]
    bucket, labels = popularity_buckets(popularity[s["target"][test]], n_buckets)
    names = list(preds)
    for name, p in preds.items():
        if len(p) != len(test):
            raise DataError(f"{name}: {len(p)} {split} predictions, the store has {len(test)} {split} rows")
    rows = []
    for i, lab in enumerate([*labels, "all"]):
        rows_i = np.ones(len(test), dtype=bool) if lab == "all" else bucket == i
        y = label[rows_i]
        if not rows_i.any() or y.min() == y.max():
            continue
        row = {
            "popularity": lab,
            "rows": int(rows_i.sum()),
            "positive_rate": round(float(y.mean()), 4),
            "auc": {},
            "p": {},
        }
        for name in names:
            row["auc"][name] = round(float(roc_auc_score(y, preds[name][rows_i])), 4)
            if name != names[0]:
                row["p"][name] = float(delong_test(y, preds[names[0]][rows_i], preds[name][rows_i])["p"])
        rows.append(row)
    return {"reference": names[0], "split": split, "buckets": rows}


def run_names(runs: list[Path]) -> list[str]:
    """Short distinct labels: the folder name (with its parent for ``seedN`` folders), with
    more parent folders where two runs would otherwise share a label."""
    parts = [Path(r).resolve().parts for r in runs]
    depth = [2 if p[-1].startswith("seed") else 1 for p in parts]
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=False)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return names
        for i in clash:
            depth[i] += 1


def split_predictions(run: Path, split: str, loaded=None) -> np.ndarray:
    """A finished run's probabilities on ``split`` (split order): test from test_pred.npy,
    valid computed from its best checkpoint (``loaded``: the run's (model, store, cfg))."""
    if split == "test":
        return np.load(Path(run) / "test_pred.npy").astype(np.float64)
    model, store, cfg = loaded or load_run(run)
    return predict(model, store, store.split_indices(split), cfg.train.eval_batch_size, cfg.train.t_max)


def diagnose(
    run: Path,
    compare: list[Path],
    out: Path,
    every: int | None = None,
    n_buckets: int | None = None,
    split: str | None = None,
) -> dict:
    """Everything the module docstring lists, for ``run`` against ``compare``; writes ``out``.

    ``split``, ``n_buckets`` and ``every`` default to configs/analysis.yaml (valid, 5, 10).
    """
    settings = analysis_settings()
    split = split or settings["split"]
    n_buckets = n_buckets or int(settings["popularity_buckets"])
    every = every or int(settings.get("retrieval_every", 10))
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    runs = [Path(run), *map(Path, compare)]
    for r in runs:
        if not (r / "test_pred.npy").is_file():
            raise DataError(f"{r} has no test_pred.npy: is it a finished run folder?")
    names = run_names(runs)
    model, store, cfg = load_run(runs[0])
    popularity = item_popularity(store)
    report = {"run": names[0], "split": split, "retrieval": {}, "gate": gate_stats(model, popularity, n_buckets)}
    preds = {}
    for i, (r, name) in enumerate(zip(runs, names, strict=False)):
        m, st, c = (model, store, cfg) if i == 0 else load_run(r)
        if hasattr(m, "retrieve_routes"):
            report["retrieval"][name] = retrieval_stats(m, store, split, every, t_max=c.train.t_max)
        preds[name] = split_predictions(r, split, (m, st, c))
    report["tail"] = tail_auc(store, preds, popularity, n_buckets, split)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "diagnostics.json", report)
    write_text_atomic(out / "diagnostics.md", diagnostics_markdown(report))
    return report


def diagnostics_markdown(report: dict) -> str:
    lines = [f"# Diagnostics of {report['run']} ({report.get('split', 'test')} split)", ""]
    if report["retrieval"]:
        first = next(iter(report["retrieval"].values()))
        lines += [
            f"## Retrieval ({first['split']}, {first['samples']:,} samples; relevant = {first['relevance']})",
            "",
            "| run | route (SID level) | filled / sample | semantic match | relevant "
            "| distinct behaviours / sample (of slots) | short window relevant |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, st in report["retrieval"].items():
            for j, r in enumerate(st["routes"]):
                tail = f"{st['distinct_per_sample']:.1f} of {st['slots_per_sample']:.1f}" if j == 0 else ""
                short = f"{st['short_relevant_share']:.3f}" if j == 0 else ""
                lvl = r["level"] if r["level"] is not None else "-"
                lines.append(
                    f"| {name if j == 0 else ''} | {j + 1} ({lvl}) | {r['filled_per_sample']:.1f} "
                    f"| {r['match_share']:.3f} | {r['relevant_share']:.3f} | {tail} | {short} |"
                )
        lines.append("")
    if report["gate"]:
        g = report["gate"]
        lines += [
            "## Gate weights by item popularity (training samples per item)",
            "",
            f"| popularity | items | {' | '.join(g['views'])} |",
            "|---|---|" + "---|" * len(g["views"]),
        ]
        lines += [
            f"| {b['popularity']} | {b['items']:,} | {' | '.join(f'{w:.3f}' for w in b['weights'])} |"
            for b in g["buckets"]
        ]
        lines.append("")
    t = report["tail"]
    names = list(t["buckets"][0]["auc"]) if t["buckets"] else []
    lines += [
        f"## {t.get('split', 'test').capitalize()} AUC by target popularity "
        f"(p: DeLong, {t['reference']} against the column's run)",
        "",
        f"| popularity | rows | positive rate | {' | '.join(names)} |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for b in t["buckets"]:
        cells = [f"{b['auc'][n]:.4f}" + (f" (p={b['p'][n]:.2g})" if n in b["p"] else "") for n in names]
        lines.append(f"| {b['popularity']} | {b['rows']:,} | {b['positive_rate']:.3f} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
