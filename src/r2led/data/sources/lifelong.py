"""``synthetic-lifelong``: planted long-range interests, with a known Bayes ceiling.

A benchmark where history beyond the last 30-100 behaviours matters by construction, and
where the generator knows every click probability, so that models are compared with the best
possible AUC. The generative story (vectorised numpy, seeded, generated block by block):

- **Topics and items** as in ``synthetic``: ``topics=(T, S, F)`` top topics, sub-topics and
  leaves; every item belongs to a leaf; its text is its topic path plus topic words
  (``category`` = top topic, ``tags`` = ``[top, sub, leaf]``), so SIDs built from text, tags
  or co-occurrence recover the hierarchy. Item popularity inside a leaf is Zipf(``zipf``); an
  item is a *head* item when it is one of the two most popular of its leaf.
- **Users** have ``interests`` stable interest leaves (distinct, drawn by leaf popularity);
  interests never drift.
- **Bursts.** A user's stream of impressions is cut into bursts of geometric length (mean
  ``burst``); each burst has a *focus*, one of the user's interests drawn uniformly. Bursts
  are separated by long gaps in time (``gap`` times the mean gap inside a burst).
- **Impressions.** An impression's leaf is the burst's focus with probability ``focus``, a
  uniformly drawn interest (a *dormant* one, most of the time) with probability ``recall``,
  else any leaf by leaf popularity. The item is drawn inside the leaf by popularity.
- **Clicks.** ``p = sigmoid(RELATION_LOGIT[rel] + HEAD_LOGIT * head)`` where ``rel`` is 3 for
  the focus leaf, 2 for another interest leaf, 1 for a leaf sharing a sub-topic with an
  interest, 0 otherwise. So recency (the focus) and popularity help short-history models,
  while knowing *all* interests needs the long history: with the defaults (32 interests among
  256 leaves, bursts of 30, recall 0.05) the last 100 behaviours show about 3 bursts and 5
  dormant recalls, a fraction of the interests; 10^3 show most and 10^4 all of them.
- **Signal** 5 = clicked, 1 = skipped (the default label rule ``signal > 3`` reads clicks).
- **Time.** One period of ``days`` days; each user starts in its first 40 % and is active to
  its end, so users interleave and the global time split has every user in every split.

``ceiling_auc(store)`` regenerates the click probabilities of a prepared store's rows (from
the generator settings in its manifest) and returns the AUC of the true probabilities on a
split: the Bayes-optimal AUC for an observer who knows every latent interest and focus.
``history_oracle`` scores samples with the true rule but only the interests visible in the
last ``t_max`` behaviours: the best a model of that history length can hope for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl

from r2led.data.sources.synthetic import PERIOD_START, distinct_leaves, lazy_frames, topic_item_table
from r2led.data.tables import INTERACTION_SCHEMA, CanonicalTables
from r2led.errors import ConfigError, DataError

RELATION_LOGIT = np.array([-2.0, -0.8, 0.8, 1.6])  # other, sub-topic of an interest, interest, focus
HEAD_LOGIT = 0.7
CLICK, SKIP = 5, 1
_BLOCK_ROWS = 1 << 21  # behaviours per generated block of users (bounds memory)
_HEAD_RANK = 2  # the two most popular items of a leaf are head items


@dataclass
class _World:
    """Draws made once per dataset: items, leaves and users' interests (O(items + users))."""

    rng: np.random.Generator
    topics: tuple[int, int, int]
    item_leaf: np.ndarray  # (N,) leaf of each item
    item_head: np.ndarray  # (N,) bool
    by_leaf: np.ndarray  # items grouped by leaf, popularity order
    leaf_cdf: np.ndarray  # per-leaf popularity CDFs shifted by the leaf id
    leaf_pop_cdf: np.ndarray  # (L,) CDF of leaf popularity
    lens: np.ndarray  # (U,) sequence lengths
    interests: np.ndarray  # (U, K) interest leaves
    start: np.ndarray  # (U,) first activity, as a fraction of the period


def _world(users, length, items, seed, topics, interests, zipf, min_length) -> _World:
    rng = np.random.default_rng(seed)
    n_leaves = topics[0] * topics[1] * topics[2]
    item_leaf = rng.permutation(np.arange(items) % n_leaves)
    by_leaf = np.argsort(item_leaf, kind="stable")
    leaf_start = np.zeros(n_leaves + 1, dtype=np.int64)
    np.cumsum(np.bincount(item_leaf, minlength=n_leaves), out=leaf_start[1:])
    rank_in_leaf = np.arange(items) - leaf_start[item_leaf[by_leaf]]
    item_head = np.zeros(items, dtype=bool)
    item_head[by_leaf] = rank_in_leaf < _HEAD_RANK
    weight = (rank_in_leaf + 1.0) ** -zipf
    leaf_total = np.bincount(item_leaf[by_leaf], weights=weight, minlength=n_leaves)
    cum = np.cumsum(weight)
    before = np.concatenate([[0.0], cum])[leaf_start[:-1]]
    leaf_of = item_leaf[by_leaf]
    leaf_cdf = leaf_of + (cum - before[leaf_of]) / leaf_total[leaf_of]
    leaf_cdf[leaf_start[1:] - 1] = np.arange(n_leaves) + 1.0
    leaf_weight = rng.permutation((np.arange(n_leaves) + 1.0) ** -0.7)
    leaf_weight /= leaf_weight.sum()
    leaf_pop_cdf = np.cumsum(leaf_weight)
    leaf_pop_cdf[-1] = 1.0
    lo = max(min_length, int(round(0.5 * length)))
    hi = max(lo, int(round(1.5 * length)))
    lens = rng.integers(lo, hi + 1, size=users, dtype=np.int64)
    chosen = distinct_leaves(rng, np.log(leaf_weight), users, interests)
    start = rng.uniform(0.0, 0.4, size=users)
    return _World(rng, topics, item_leaf, item_head, by_leaf, leaf_cdf, leaf_pop_cdf, lens, chosen, start)


def _block(
    w: _World, a: int, b: int, block: int, seed: int, burst, focus, recall, gap, days
) -> tuple[pl.DataFrame, np.ndarray]:
    """Interactions of users ``a .. b-1`` and each row's true click probability."""
    rng = np.random.default_rng([seed, 2, block])
    n_top, n_sub, n_leaf = w.topics
    n_leaves = n_top * n_sub * n_leaf
    lens = w.lens[a:b]
    interests = w.interests[a:b]  # (Ub, K)
    ub, k = interests.shape
    offsets = np.zeros(ub + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    n = int(offsets[-1])
    user = np.repeat(np.arange(ub), lens)  # (n,) user within the block
    pos = np.arange(n, dtype=np.int64) - offsets[user]

    # Bursts: a new one starts with probability 1 / burst (always at a user's first row).
    starts = rng.random(n) < 1.0 / burst
    starts[offsets[:-1]] = True
    burst_id = np.cumsum(starts) - 1  # (n,) global burst index in the block
    n_bursts = int(burst_id[-1]) + 1 if n else 0
    burst_user = user[starts]
    burst_focus = interests[burst_user, rng.integers(0, k, size=n_bursts)]  # (bursts,)
    focus_leaf = burst_focus[burst_id]

    kind = rng.random(n)
    leaf = np.searchsorted(w.leaf_pop_cdf, rng.random(n), side="right")  # any leaf
    recalled = interests[user, rng.integers(0, k, size=n)]
    leaf = np.where(kind < focus + recall, recalled, leaf)
    leaf = np.where(kind < focus, focus_leaf, leaf)
    del kind, recalled
    item = w.by_leaf[np.searchsorted(w.leaf_cdf, leaf + rng.random(n), side="right")]

    is_interest = np.zeros((ub, n_leaves), dtype=bool)
    is_interest[np.arange(ub)[:, None], interests] = True
    sub_of_interest = np.zeros((ub, n_top * n_sub), dtype=bool)
    sub_of_interest[np.arange(ub)[:, None], interests // n_leaf] = True
    rel = np.where(
        leaf == focus_leaf,
        3,
        np.where(is_interest[user, leaf], 2, np.where(sub_of_interest[user, leaf // n_leaf], 1, 0)),
    )
    logit = RELATION_LOGIT[rel] + HEAD_LOGIT * w.item_head[item]
    p = 1.0 / (1.0 + np.exp(-logit))
    click = rng.random(n) < p

    # Time: short gaps inside a burst, long ones between bursts; each user spans [start, 1).
    step = rng.exponential(1.0, size=n) * np.where(starts, gap, 1.0)
    cum = np.cumsum(step)
    first = offsets[:-1]
    cum = cum - cum[first][user] + step[first][user]  # per user, from its first step
    total = cum[offsets[1:] - 1] + rng.exponential(1.0, size=ub)  # leave room after the last row
    frac = w.start[a:b][user] + (1.0 - w.start[a:b][user]) * cum / total[user]
    ts = (PERIOD_START + days * 86_400.0 * frac).astype(np.int64)
    del pos
    frame = pl.DataFrame(
        {
            "user": pl.Series(user + (a + 1)).cast(pl.String),
            "item": pl.Series(item + 1).cast(pl.String),
            "ts": ts,
            "signal": pl.Series(np.where(click, CLICK, SKIP)).cast(pl.Int64),
        }
    )
    return frame, p


def _user_blocks(lens: np.ndarray) -> np.ndarray:
    offsets = np.concatenate([[0], np.cumsum(lens)])
    starts = np.unique(np.searchsorted(offsets[:-1], np.arange(0, offsets[-1], _BLOCK_ROWS), side="right") - 1)
    return np.concatenate([starts, [len(lens)]])


def load_lifelong(
    users: int = 300,
    length: int = 10_000,
    items: int = 4_000,
    seed: int = 0,
    topics: tuple[int, int, int] = (4, 8, 8),
    interests: int = 32,
    burst: float = 30.0,
    focus: float = 0.5,
    recall: float = 0.05,
    gap: float = 200.0,
    zipf: float = 1.1,
    days: int = 730,
    min_length: int = 6,
    lazy: bool = False,
) -> CanonicalTables:
    """Generate ``synthetic-lifelong`` canonical tables (see the module docstring).

    ``users`` x about ``length`` impressions (uniform in [0.5, 1.5] x length) over ``items``
    items; the same settings give identical tables. ``lazy=True`` streams the interactions.
    """
    settings = dict(
        users=users,
        length=length,
        items=items,
        seed=seed,
        topics=tuple(topics),
        interests=interests,
        burst=burst,
        focus=focus,
        recall=recall,
        gap=gap,
        zipf=zipf,
        days=days,
        min_length=min_length,
    )
    _check(settings)
    w = _world(users, length, items, seed, tuple(topics), interests, zipf, min_length)
    blocks = _user_blocks(w.lens)

    def frames() -> Iterator[pl.DataFrame]:
        for i, (lo, hi) in enumerate(zip(blocks[:-1], blocks[1:], strict=False)):
            yield _block(w, int(lo), int(hi), i, seed, burst, focus, recall, gap, days)[0]

    item_table = topic_item_table(w.rng, w.item_leaf, tuple(topics))
    n_top = topics[0]
    segment = w.interests[np.arange(users), w.rng.integers(0, interests, size=users)] // (topics[1] * topics[2])
    user_table = pl.DataFrame(
        {"user": pl.Series(np.arange(1, users + 1)).cast(pl.String), "segment": [f"seg-{s % n_top}" for s in segment]}
    )
    info = {"generator": "r2led.data.sources.lifelong", **settings, "topics": list(topics), "rows": int(w.lens.sum())}
    if lazy:
        return CanonicalTables(
            "synthetic-lifelong", lazy_frames(frames, INTERACTION_SCHEMA), item_table, user_table, info
        )
    interactions = pl.concat(list(frames()), rechunk=True)
    return CanonicalTables("synthetic-lifelong", interactions, item_table, user_table, info).validate()


def _check(s: dict) -> None:
    topics = s["topics"]
    if len(topics) != 3 or min(topics) < 1:
        raise ConfigError(f"synthetic-lifelong: topics must be three positive counts; got {topics}")
    n_leaves = topics[0] * topics[1] * topics[2]
    for name in ("users", "length", "interests", "days", "min_length"):
        if s[name] < 1:
            raise ConfigError(f"synthetic-lifelong: {name} must be >= 1; got {s[name]}")
    if s["interests"] > n_leaves:
        raise ConfigError(
            f"synthetic-lifelong: interests={s['interests']} exceeds the {n_leaves} leaves of topics={topics}"
        )
    if s["items"] < n_leaves * _HEAD_RANK:
        raise ConfigError(
            f"synthetic-lifelong: items={s['items']} is fewer than {_HEAD_RANK} per leaf ({n_leaves} leaves)"
        )
    if s["burst"] < 1 or s["gap"] < 1:
        raise ConfigError(f"synthetic-lifelong: burst and gap must be >= 1; got burst={s['burst']}, gap={s['gap']}")
    if not (s["focus"] >= 0 and s["recall"] >= 0 and s["focus"] + s["recall"] <= 1):
        raise ConfigError(
            "synthetic-lifelong: focus and recall must be >= 0 with focus + recall <= 1; "
            f"got {s['focus']}, {s['recall']}"
        )


# ---- the truth, for a prepared store ----------------------------------------------------------


def _settings(store) -> dict:
    source = store.manifest.get("source", {})
    if source.get("generator") != "r2led.data.sources.lifelong":
        raise DataError(f"{store.root} was not prepared from synthetic-lifelong (source: {source.get('generator')!r})")
    keys = (
        "users",
        "length",
        "items",
        "seed",
        "topics",
        "interests",
        "burst",
        "focus",
        "recall",
        "gap",
        "zipf",
        "days",
        "min_length",
    )
    return {k: (tuple(source[k]) if k == "topics" else source[k]) for k in keys}


def true_click_probability(store) -> np.ndarray:
    """(I,) the true click probability of every row of ``store``'s CSR arrays.

    Regenerates the data from the manifest's generator settings and aligns it with the
    store's rows (per user, ordered by time then item key, as the store writer orders them);
    raises ``DataError`` if the regenerated items do not match the store's.
    """
    s = _settings(store)
    w = _world(s["users"], s["length"], s["items"], s["seed"], s["topics"], s["interests"], s["zipf"], s["min_length"])
    blocks = _user_blocks(w.lens)
    out = np.empty(int(store.offsets[-1]), dtype=np.float64)
    user_keys = store.users["key"].cast(pl.Int64).to_numpy()  # store user u has key user_keys[u]
    row_of_key = np.empty(int(user_keys.max()) + 1, dtype=np.int64)
    row_of_key[user_keys] = np.arange(len(user_keys))
    item_keys = store.items["key"].cast(pl.Int64).to_numpy()
    item_of_key = np.zeros(int(item_keys.max()) + 1, dtype=np.int64)
    item_of_key[item_keys] = np.arange(1, len(item_keys) + 1)
    for i, (lo, hi) in enumerate(zip(blocks[:-1], blocks[1:], strict=False)):
        frame, p = _block(w, int(lo), int(hi), i, s["seed"], s["burst"], s["focus"], s["recall"], s["gap"], s["days"])
        u = row_of_key[frame["user"].cast(pl.Int64).to_numpy()]
        it = item_of_key[frame["item"].cast(pl.Int64).to_numpy()]
        ts = frame["ts"].to_numpy()
        order = np.lexsort((item_keys[it - 1], ts, u))  # user, then time, then item key; stable
        u, it, p = u[order], it[order], p[order]
        starts = np.searchsorted(u, u, side="left")
        dest = store.offsets[u] + (np.arange(len(u)) - starts)
        if not np.array_equal(store.seq_items[dest], it):
            raise DataError(f"{store.root}: the regenerated rows do not match the store (another generator version?)")
        out[dest] = p
    return out


def _auc(label: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(label, score))


def ceiling_auc(store, split: str = "test") -> float:
    """AUC of the true click probabilities on ``split``: the Bayes-optimal AUC."""
    p = true_click_probability(store)
    idx = store.split_indices(split)
    s = store.sample_arrays
    return _auc(s["label"][idx], p[store.offsets[s["user"][idx]] + s["pos"][idx]])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def history_oracle(store, sample_idx: np.ndarray, t_max: int, recent: int = 10) -> np.ndarray:
    """Scores from the true click rule, with the latent state inferred from the last ``t_max``
    behaviours only: the accuracy a model of that history length can hope for.

    Per leaf, the clicks ``c`` and skips ``m`` in the window give the posterior that it is an
    interest (click rates 0.72 against 0.2, prior ``interests / leaves``); the leaf clicked most
    among the last ``recent`` behaviours is taken for the focus. The score is the expected
    click probability under that posterior (head flags are known).
    """
    s = _settings(store)
    n_top, n_sub, n_leaf = s["topics"]
    n_leaves = n_top * n_sub * n_leaf
    w = _world(s["users"], s["length"], s["items"], s["seed"], s["topics"], s["interests"], s["zipf"], s["min_length"])
    item_keys = store.items["key"].cast(pl.Int64).to_numpy()
    leaf = np.zeros(store.n_items + 1, dtype=np.int64)  # store item id -> leaf
    leaf[1:] = w.item_leaf[item_keys - 1]
    head = np.zeros(store.n_items + 1, dtype=bool)
    head[1:] = w.item_head[item_keys - 1]
    prior = np.log(s["interests"] / (n_leaves - s["interests"]))
    click_llr, skip_llr = np.log(0.72 / 0.2), np.log(0.28 / 0.8)
    arrays = store.sample_arrays
    scores = np.empty(len(sample_idx), dtype=np.float64)
    for j, k in enumerate(np.asarray(sample_idx)):
        u, pos = int(arrays["user"][k]), int(arrays["pos"][k])
        a = int(store.offsets[u])
        window = slice(a + max(0, pos - t_max), a + pos)
        w_leaf, w_click = leaf[store.seq_items[window]], store.seq_signal[window] == CLICK
        clicks = np.bincount(w_leaf[w_click], minlength=n_leaves)
        skips = np.bincount(w_leaf[~w_click], minlength=n_leaves)
        post = _sigmoid(prior + click_llr * clicks + skip_llr * skips)  # (L,) P(interest)
        recent_clicks = w_leaf[-recent:][w_click[-recent:]]
        target = int(arrays["target"][k])
        t_leaf, h = leaf[target], HEAD_LOGIT * head[target]
        p_rel = _sigmoid(RELATION_LOGIT + h)  # (4,) click probability per relation
        if len(recent_clicks) and np.bincount(recent_clicks).argmax() == t_leaf:
            scores[j] = 0.9 * p_rel[3] + 0.1 * p_rel[2]
            continue
        q = post[t_leaf]
        sib = post[(t_leaf // n_leaf) * n_leaf : (t_leaf // n_leaf + 1) * n_leaf].copy()
        sib[t_leaf % n_leaf] = 0.0
        r = 1.0 - np.prod(1.0 - sib)  # P(some other leaf of the sub-topic is an interest)
        scores[j] = q * p_rel[2] + (1 - q) * (r * p_rel[1] + (1 - r) * p_rel[0])
    return scores


def oracle_auc(store, t_max: int, split: str = "test", limit: int | None = None) -> float:
    """AUC of ``history_oracle`` on ``split`` (its first ``limit`` samples)."""
    idx = store.split_indices(split)[:limit]
    return _auc(store.sample_arrays["label"][idx], history_oracle(store, idx, t_max))
