"""Synthetic lifelong sequences with a hidden topic hierarchy, for tests and for scale.

The generative story (all of it vectorised numpy, seeded, no loop per behaviour):

- **Topics.** ``topics=(T, S, F)`` makes ``T`` top topics, ``S`` sub-topics under each and
  ``F`` leaves under each sub-topic (``T*S*F`` leaves). Topic ``A`` has sub-topics ``A-1 ..``
  and those have leaves ``A-1-1 ..``. Every topic node owns a few pseudo-words from a fixed
  vocabulary (it depends on ``topics`` only, never on ``seed``).
- **Items.** Each item belongs to one leaf. Its text is its topic path plus words drawn from
  the vocabularies of its top topic, sub-topic and leaf, and two item-specific words, e.g.
  ``"topic B / sub B-2 / leaf B-2-4 | item 517 | zuvo kapi tesu mela rofi | nexo dalu"``,
  so that TF-IDF or a sentence encoder can recover the hierarchy. ``category`` is the top
  topic's name, ``tags`` is ``[top, sub, leaf]``.
- **Popularity.** Inside a leaf, items are drawn with Zipf weights ``rank ** -zipf``; leaves
  themselves get a milder skew (``rank ** -0.7``).
- **Users.** Each user has ``interests`` long-term interest leaves (the popular leaves are
  likelier) with Dirichlet weights. Their sequence is cut into segments of ``segment``
  behaviours; at each segment boundary every interest is, with probability ``drift``,
  replaced by a new leaf (half the time a sibling of the original interest). A behaviour is
  exploration with probability ``explore`` (a leaf drawn by leaf popularity), otherwise it
  picks one of the user's current interests.
- **Signal.** A rating 1..5: ``round(2.3 + 1.6 * fit + quality_item + bias_user + noise)``,
  clipped, where ``fit`` is 1 for a current-interest leaf, 0.6 for a sibling of one, 0.3 for
  the same top topic and 0 otherwise. So ``signal > 3`` is predictable from recent history.
- **Time.** One shared period (``days`` days from 2020-01-01); each user is active over
  their own window inside it, so users interleave and a global time split works.
- **User features.** ``segment`` (the main interest's top topic, 80 % of the time),
  ``region`` (tied to the main interest's sub-topic half of the time) and ``activity``
  (sequence-length tercile).

Sequence lengths are uniform in ``[0.5, 1.5] x length`` (at least ``min_length``).
``load_synthetic(users=10_000, length=2_000, items=20_000)`` (20M behaviours) takes about
10 s on 2 cores; 3 users x 10^5 behaviours take 0.3 s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
from polars.io.plugins import register_io_source

from r2led.data.tables import INTERACTION_SCHEMA, CanonicalTables
from r2led.errors import ConfigError

PERIOD_START = 1_577_836_800  # 2020-01-01T00:00:00Z
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_USER_CHUNK = 1 << 16  # users per chunk when sampling distinct interests (bounds memory)
_BLOCK_ROWS = 1 << 21  # behaviours per generated block of users (bounds memory)


def load_synthetic(
    users: int = 1000,
    length: int = 200,
    items: int = 2000,
    seed: int = 0,
    topics: tuple[int, int, int] = (4, 4, 4),
    zipf: float = 1.1,
    interests: int = 3,
    drift: float = 0.1,
    explore: float = 0.2,
    segment: int = 50,
    noise: float = 0.9,
    days: int = 365,
    min_length: int = 6,
    lazy: bool = False,
) -> CanonicalTables:
    """Generate canonical tables (see the module docstring for the generative story).

    ``users`` x about ``length`` behaviours over ``items`` items; same ``seed`` -> identical
    tables. ``min_length`` should be at least the protocol's ``min_history + 1`` so that every
    user yields samples. ``lazy=True`` returns the interactions as a ``pl.LazyFrame`` that
    generates blocks of users on demand (``r2led data prepare synthetic`` streams it into the
    store); the rows are the same either way.
    """
    _check(users, length, items, topics, zipf, interests, drift, explore, segment, noise, days, min_length)
    world = _world(users, length, items, seed, topics, zipf, interests, min_length)
    params = (drift, explore, segment, noise, days)
    blocks = _user_blocks(world.lens)

    def frames() -> Iterator[pl.DataFrame]:
        for b, (lo, hi) in enumerate(zip(blocks[:-1], blocks[1:], strict=False)):
            yield _behaviour_block(world, int(lo), int(hi), b, seed, *params)

    item_table = topic_item_table(world.rng, world.item_leaf, topics)
    user_table = _user_table(world.rng, world.main_leaf, world.leaf_top, world.leaf_sub, world.lens, topics)
    info = {
        "generator": "r2led.data.sources.synthetic",
        "seed": seed,
        "users": users,
        "length": length,
        "items": items,
        "topics": list(topics),
        "zipf": zipf,
        "interests": interests,
        "drift": drift,
        "explore": explore,
        "segment": segment,
        "noise": noise,
        "days": days,
        "rows": int(world.lens.sum()),
    }
    if lazy:
        return CanonicalTables("synthetic", lazy_frames(frames, INTERACTION_SCHEMA), item_table, user_table, info)
    interactions = pl.concat(list(frames()), rechunk=True)
    return CanonicalTables("synthetic", interactions, item_table, user_table, info).drop_duplicates().validate()


def lazy_frames(make: Callable[[], Iterator[pl.DataFrame]], schema: dict) -> pl.LazyFrame:
    """A ``pl.LazyFrame`` whose rows are produced block by block by ``make()`` (streamed)."""

    def source(with_columns, predicate, n_rows, batch_size) -> Iterator[pl.DataFrame]:
        left = n_rows
        for frame in make():
            if with_columns is not None:
                frame = frame.select(with_columns)
            if predicate is not None:
                frame = frame.filter(predicate)
            if left is not None:
                frame = frame.head(left)
                left -= frame.height
            yield frame
            if left is not None and left <= 0:
                return

    return register_io_source(source, schema=schema)


def _user_blocks(lens: np.ndarray) -> np.ndarray:
    """Boundaries of consecutive user blocks of about ``_BLOCK_ROWS`` behaviours each.

    Fixed by the sequence lengths alone, so the data never depends on how it is consumed.
    """
    offsets = np.concatenate([[0], np.cumsum(lens)])
    starts = np.unique(np.searchsorted(offsets[:-1], np.arange(0, offsets[-1], _BLOCK_ROWS), side="right") - 1)
    return np.concatenate([starts, [len(lens)]])


@dataclass
class _World:
    """Everything drawn once per dataset (items, leaves, users), O(items + users) memory."""

    rng: np.random.Generator
    n_leaf: int
    leaf_sub: np.ndarray
    leaf_top: np.ndarray
    by_leaf: np.ndarray
    leaf_cdf: np.ndarray
    quality: np.ndarray
    leaf_weight: np.ndarray
    leaf_pop_cdf: np.ndarray
    item_leaf: np.ndarray
    lens: np.ndarray
    base: np.ndarray
    slot_cdf: np.ndarray
    main_leaf: np.ndarray
    user_bias: np.ndarray
    win_start: np.ndarray
    win_len: np.ndarray


def _world(users, length, items, seed, topics, zipf, interests, min_length) -> _World:
    rng = np.random.default_rng(seed)
    n_top, n_sub, n_leaf = topics
    n_leaves = n_top * n_sub * n_leaf
    leaf_ids = np.arange(n_leaves)
    leaf_sub = leaf_ids // n_leaf  # global sub-topic index of each leaf
    leaf_top = leaf_ids // (n_sub * n_leaf)

    # ---- items: leaf, popularity rank inside the leaf, quality --------------------------------
    item_leaf = rng.permutation(np.arange(items) % n_leaves)  # every leaf gets items
    by_leaf = np.argsort(item_leaf, kind="stable")  # items grouped by leaf, popularity order
    leaf_start = np.zeros(n_leaves + 1, dtype=np.int64)
    np.cumsum(np.bincount(item_leaf, minlength=n_leaves), out=leaf_start[1:])
    rank_in_leaf = np.arange(items) - leaf_start[item_leaf[by_leaf]]
    weight = (rank_in_leaf + 1.0) ** -zipf
    leaf_total = np.bincount(item_leaf[by_leaf], weights=weight, minlength=n_leaves)
    # Per-leaf CDFs concatenated and shifted by the leaf id: monotone, so one searchsorted of
    # (leaf + u) draws an item of that leaf for every behaviour at once.
    cum = np.cumsum(weight)
    before = np.concatenate([[0.0], cum])[leaf_start[:-1]]
    leaf_cdf = item_leaf[by_leaf] + (cum - before[item_leaf[by_leaf]]) / leaf_total[item_leaf[by_leaf]]
    leaf_cdf[leaf_start[1:] - 1] = np.arange(n_leaves) + 1.0  # exact ends against rounding
    quality = rng.normal(0.0, 0.4, size=items).astype(np.float32)

    leaf_weight = rng.permutation((leaf_ids + 1.0) ** -0.7)
    leaf_weight /= leaf_weight.sum()
    leaf_pop_cdf = np.cumsum(leaf_weight)
    leaf_pop_cdf[-1] = 1.0

    # ---- users: lengths, interests, weights, bias, activity window ----------------------------
    lo = max(min_length, int(round(0.5 * length)))
    hi = max(lo, int(round(1.5 * length)))
    lens = rng.integers(lo, hi + 1, size=users, dtype=np.int64)
    k = min(interests, n_leaves)
    base = distinct_leaves(rng, np.log(leaf_weight), users, k)  # (U, K)
    slot_weight = rng.dirichlet(np.ones(k), size=users)  # (U, K)
    slot_cdf = np.cumsum(slot_weight, axis=1).astype(np.float32)  # (U, K)
    main_leaf = base[np.arange(users), slot_weight.argmax(axis=1)]  # (U,) the strongest interest
    user_bias = rng.normal(0.0, 0.4, size=users).astype(np.float32)
    win_start = rng.uniform(0.0, 0.6, size=users)
    win_len = rng.uniform(0.2, 1.0, size=users) * (1.0 - win_start)
    return _World(
        rng,
        n_leaf,
        leaf_sub,
        leaf_top,
        by_leaf,
        leaf_cdf,
        quality,
        leaf_weight,
        leaf_pop_cdf,
        item_leaf,
        lens,
        base,
        slot_cdf,
        main_leaf,
        user_bias,
        win_start,
        win_len,
    )


def _behaviour_block(
    w: _World, a: int, b: int, block: int, seed: int, drift, explore, segment, noise, days
) -> pl.DataFrame:
    """Interactions of users ``a .. b-1``, from the block's own random stream."""
    rng = np.random.default_rng([seed, 1, block])
    users = b - a
    lens = w.lens[a:b]
    base, slot_cdf = w.base[a:b], w.slot_cdf[a:b]
    k = base.shape[1]
    n_leaf, leaf_sub, leaf_top = w.n_leaf, w.leaf_sub, w.leaf_top
    n_leaves = len(leaf_sub)
    offsets = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    n_beh = int(offsets[-1])

    # ---- drift: the interests of every segment of every user ---------------------------------
    n_seg = (lens + segment - 1) // segment
    seg_offsets = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(n_seg, out=seg_offsets[1:])
    total_seg = int(seg_offsets[-1])
    seg_user = np.repeat(np.arange(users), n_seg)
    sibling = leaf_sub[base[seg_user]] * n_leaf + rng.integers(0, n_leaf, size=(total_seg, k))
    anywhere = np.searchsorted(w.leaf_pop_cdf, rng.random((total_seg, k)), side="right")
    candidate = np.where(rng.random((total_seg, k)) < 0.5, sibling, anywhere)
    event = rng.random((total_seg, k)) < drift
    first = seg_offsets[:-1][n_seg > 0]
    candidate[first] = base[n_seg > 0]
    event[first] = True
    # Forward-fill: each segment takes the candidate of its latest event (every user's first
    # segment is an event, so nothing leaks across users).
    src = np.maximum.accumulate(np.where(event, np.arange(total_seg)[:, None], 0), axis=0)
    current = np.take_along_axis(candidate, src, axis=0).astype(np.int16 if n_leaves < 2**15 else np.int32)  # (S, K)

    # ---- behaviours ---------------------------------------------------------------------------
    beh_user = np.repeat(np.arange(users, dtype=np.int32), lens)  # (N,) user within the block
    pos = np.arange(n_beh, dtype=np.int64) - offsets[beh_user]  # (N,)
    seg = seg_offsets[beh_user] + pos // segment  # (N,)

    u = rng.random(n_beh, dtype=np.float32)
    slot = np.zeros(n_beh, dtype=np.int16 if k < 2**15 else np.int32)
    for j in range(k - 1):
        slot += u > slot_cdf[beh_user, j]
    leaf = current[seg, slot].astype(np.int32)
    del slot, u
    exploring = rng.random(n_beh, dtype=np.float32) < explore
    leaf[exploring] = np.searchsorted(w.leaf_pop_cdf, rng.random(int(exploring.sum())), side="right")
    del exploring
    item = w.by_leaf[np.searchsorted(w.leaf_cdf, leaf + rng.random(n_beh), side="right")].astype(np.int32)

    # Fit of the behaviour's leaf to the user's interests at that time.
    # relation 0 = other top topic, 1 = same top, 2 = same sub-topic (sibling), 3 = same leaf
    relation = np.zeros(n_beh, dtype=np.int8)
    for j in range(k):
        cur = current[seg, j]
        rel = (leaf_top[cur] == leaf_top[leaf]).astype(np.int8)
        rel += leaf_sub[cur] == leaf_sub[leaf]
        rel += cur == leaf
        np.maximum(relation, rel, out=relation)
    fit = np.array([0.0, 0.3, 0.6, 1.0], dtype=np.float32)[relation]
    del relation, seg
    latent = np.float32(2.3) + np.float32(1.6) * fit + w.quality[item] + w.user_bias[a:b][beh_user]
    latent += rng.standard_normal(n_beh, dtype=np.float32) * np.float32(noise)
    signal = np.clip(np.rint(latent), 1, 5).astype(np.int8)
    del latent, fit

    period = days * 86_400.0
    frac = (pos + rng.random(n_beh)) / lens[beh_user]
    ts = (PERIOD_START + period * (w.win_start[a:b][beh_user] + w.win_len[a:b][beh_user] * frac)).astype(np.int64)
    del frac, pos
    return pl.DataFrame(
        {
            "user": pl.Series(beh_user + (a + 1)).cast(pl.String),
            "item": pl.Series(item + 1).cast(pl.String),
            "ts": ts,
            "signal": pl.Series(signal).cast(pl.Int64),
        }
    )


def _check(users, length, items, topics, zipf, interests, drift, explore, segment, noise, days, min_length) -> None:
    if len(topics) != 3 or min(topics) < 1:
        raise ConfigError(f"topics must be three positive counts (top, sub, leaf); got {topics}")
    n_leaves = topics[0] * topics[1] * topics[2]
    for name, value, low in (
        ("users", users, 1),
        ("length", length, 1),
        ("interests", interests, 1),
        ("segment", segment, 1),
        ("days", days, 1),
        ("min_length", min_length, 1),
    ):
        if value < low:
            raise ConfigError(f"synthetic: {name} must be >= {low}; got {value}")
    if items < n_leaves:
        raise ConfigError(f"synthetic: items={items} is fewer than the {n_leaves} leaves of topics={topics}")
    for name, value in (("drift", drift), ("explore", explore)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"synthetic: {name} must be in [0, 1]; got {value}")
    if zipf < 0 or noise < 0:
        raise ConfigError(f"synthetic: zipf and noise must be >= 0; got zipf={zipf}, noise={noise}")


def distinct_leaves(rng: np.random.Generator, log_weight: np.ndarray, users: int, k: int) -> np.ndarray:
    """(users, k) distinct leaves per user, drawn by weight without replacement (Gumbel top-k)."""
    out = np.empty((users, k), dtype=np.int64)
    for a in range(0, users, _USER_CHUNK):
        b = min(a + _USER_CHUNK, users)
        scores = log_weight[None, :] + rng.gumbel(size=(b - a, len(log_weight)))
        out[a:b] = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return out


def _top_names(n: int) -> list[str]:
    if n <= 26:
        return [chr(ord("A") + i) for i in range(n)]
    return [f"T{i + 1}" for i in range(n)]


def _vocabulary(n_words: int) -> np.ndarray:
    """``n_words`` distinct pseudo-words made of consonant-vowel syllables, in a fixed order."""
    syll = np.array([c + v for c in _CONSONANTS for v in _VOWELS])
    n_syll = len(syll)
    n_len = 2 if n_words <= n_syll**2 else 3
    if n_words > n_syll**n_len:
        raise ConfigError(f"synthetic: {n_words} topic words needed, at most {n_syll**3} available; use fewer topics")
    # A fixed shuffle of all words of that many syllables (independent of the data seed), so
    # that neighbouring topics do not share syllables.
    code = np.random.default_rng(12345).permutation(n_syll**n_len)[:n_words]
    words = syll[code % n_syll]
    for _ in range(n_len - 1):
        code = code // n_syll
        words = np.char.add(syll[code % n_syll], words)
    return words


def topic_item_table(rng: np.random.Generator, item_leaf: np.ndarray, topics: tuple[int, int, int]) -> pl.DataFrame:
    """Canonical item table for items in leaves ``item_leaf`` of the ``topics`` hierarchy:
    text from the topic path and topic words, ``category`` = top topic, ``tags`` = path."""
    n_top, n_sub, n_leaf = topics
    per_top, per_sub, per_leaf, n_common = 8, 6, 4, 200
    n_subs, n_leaves = n_top * n_sub, n_top * n_sub * n_leaf
    vocab = _vocabulary(n_top * per_top + n_subs * per_sub + n_leaves * per_leaf + n_common)
    top_vocab = vocab[: n_top * per_top].reshape(n_top, per_top)
    o = n_top * per_top
    sub_vocab = vocab[o : o + n_subs * per_sub].reshape(n_subs, per_sub)
    o += n_subs * per_sub
    leaf_vocab = vocab[o : o + n_leaves * per_leaf].reshape(n_leaves, per_leaf)
    common = vocab[o + n_leaves * per_leaf :]

    tops = np.array(_top_names(n_top))
    leaf = item_leaf
    sub = leaf // n_leaf
    top = sub // n_sub
    top_name = tops[top]
    sub_name = np.char.add(np.char.add(top_name, "-"), (sub % n_sub + 1).astype(str))
    leaf_name = np.char.add(np.char.add(sub_name, "-"), (leaf % n_leaf + 1).astype(str))
    n = len(item_leaf)

    def pick(table: np.ndarray, row: np.ndarray, count: int) -> list[np.ndarray]:
        # ``count`` distinct words of the node's vocabulary per item
        cols = np.argsort(rng.random((n, table.shape[1])), axis=1)[:, :count]
        return [table[row, cols[:, j]] for j in range(count)]

    words = pick(top_vocab, top, 2) + pick(sub_vocab, sub, 2) + pick(leaf_vocab, leaf, 2)
    own = rng.integers(0, len(common), size=(n, 2))
    df = pl.DataFrame(
        {
            "item": pl.Series(np.arange(1, n + 1)).cast(pl.String),
            "top": top_name,
            "sub": sub_name,
            "leaf": leaf_name,
            **{f"w{j}": w for j, w in enumerate(words)},
            "o0": common[own[:, 0]],
            "o1": common[own[:, 1]],
        }
    )
    text = pl.concat_str(
        [
            pl.lit("topic "),
            pl.col("top"),
            pl.lit(" / sub "),
            pl.col("sub"),
            pl.lit(" / leaf "),
            pl.col("leaf"),
            pl.lit(" | item "),
            pl.col("item"),
            pl.lit(" | "),
            pl.concat_str([pl.col(f"w{j}") for j in range(len(words))], separator=" "),
            pl.lit(" | "),
            pl.col("o0"),
            pl.lit(" "),
            pl.col("o1"),
        ]
    )
    return df.select(
        "item",
        text.alias("text"),
        pl.col("top").alias("category"),
        pl.concat_list("top", "sub", "leaf").alias("tags"),
    )


def _user_table(
    rng: np.random.Generator,
    main_leaf: np.ndarray,
    leaf_top: np.ndarray,
    leaf_sub: np.ndarray,
    lens: np.ndarray,
    topics: tuple[int, int, int],
) -> pl.DataFrame:
    users = len(main_leaf)
    n_top = topics[0]
    n_regions = 8
    tops = np.array(_top_names(n_top))
    segment = np.where(rng.random(users) < 0.8, leaf_top[main_leaf], rng.integers(0, n_top, size=users))
    region = np.where(rng.random(users) < 0.5, leaf_sub[main_leaf] % n_regions, rng.integers(0, n_regions, size=users))
    cuts = np.quantile(lens, [1 / 3, 2 / 3]) if users > 2 else np.array([np.inf, np.inf])
    activity = np.array(["low", "mid", "high"])[np.searchsorted(cuts, lens, side="right")]
    return pl.DataFrame(
        {
            "user": pl.Series(np.arange(1, users + 1)).cast(pl.String),
            "segment": np.char.add("seg-", tops[segment]),
            "region": np.char.add("r", region.astype(str)),
            "activity": activity,
        }
    )
