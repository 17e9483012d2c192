"""The speed benchmark's synthetic workload: a catalogue with hierarchical SIDs, Zipf-skewed
histories, candidates, request and training batches, and the models' shared bench config.

What the data look like, and why, is in the docstring of ``r2led.bench.speed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from r2led.data.batches import Batch
from r2led.errors import ConfigError
from r2led.models.registry import model_class
from r2led.models.spec import DataSpec
from r2led.models.user_state import UserState
from r2led.sid.table import SidTable

REFERENCE = "r2led"  # the model every figure is compared with (ratios to it in the reports)
# R2LED with each per-route encoder, whatever the default ("r2led" is the default config), with
# smaller DIN units (``model.unit``; their ml-1m accuracy: docs/results/encoder_ml1m.md), and
# with the approximate collaborative index (``R2LED.collaborative_bands``, a serving switch).
VARIANTS = {
    "r2led[din]": ("r2led", {"attention": "din"}),
    "r2led[mha]": ("r2led", {"attention": "mha"}),
    "r2led[unit32x16]": ("r2led", {"attention": "din", "unit": [32, 16]}),
    "r2led[unit16]": ("r2led", {"attention": "din", "unit": [16]}),
    "r2led[lsh]": ("r2led", {}),
}
SERVING_SWITCHES = {"r2led[lsh]": {"collaborative_bands": 8}}  # set on the built model
BRANCHING = (16, 16, 16)  # SID codebook sizes per level (the hidden topic hierarchy)
USER_FEATURES = [3, 8, 22]  # cardinalities incl. 0 = unknown (like gender, age, occupation)
SIGNAL_SIZE = 6  # ratings 1..5, 0 = padding
TRAIN_T_MAX = 100_000  # training batches hold at most this many behaviours per sample


# ---- synthetic data ------------------------------------------------------------------------
@dataclass
class Catalogue:
    """A synthetic catalogue: the model-facing DataSpec and SID table, plus how to draw items."""

    spec: DataSpec
    sid: SidTable
    topic_items: list[np.ndarray]  # per top topic: its items, most popular first
    topic_cdf: list[np.ndarray]  # per top topic: Zipf CDF over topic_items
    global_cdf: np.ndarray  # Zipf CDF over all items 1..N (by a fixed popularity order)
    global_items: np.ndarray


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    cdf = np.cumsum((np.arange(n) + 1.0) ** -exponent)
    return cdf / cdf[-1]


def synthetic_catalogue(
    items: int, seed: int = 0, branching: tuple[int, ...] = BRANCHING, zipf: float = 1.1
) -> Catalogue:
    """``items`` items on the leaves of a hidden hierarchy; SID codes = the leaf's path.

    Leaves get skewed sizes (weight ``rank ** -0.7``), so some SID prefixes hold many items and
    many leaves hold none or one, as RQ-KMeans codes on real data do; collisions are allowed.
    """
    if items < 2:
        raise ConfigError(f"items: the synthetic catalogue needs at least 2 items, got {items}")
    rng = np.random.default_rng(seed)
    n_leaves = math.prod(branching)
    leaf_weight = rng.permutation((np.arange(n_leaves) + 1.0) ** -0.7)
    leaf = rng.choice(n_leaves, size=items, p=leaf_weight / leaf_weight.sum())
    codes = np.stack(np.unravel_index(leaf, branching), axis=1).astype(np.int64)  # (N, L)
    sid = SidTable.from_codes(
        codes, {"encoder": "synthetic hierarchy", "codebook_sizes": list(branching), "seed": seed}
    )

    ids = np.arange(1, items + 1)
    top = codes[:, 0]
    category = np.concatenate([[0], top + 1])  # (N+1,)
    v2 = sid.vocab_sizes[1] if sid.levels > 1 else 1
    tags = np.zeros((items + 1, 2), dtype=np.int64)  # tags = level-2 and level-3 prefixes
    tags[:, 0] = sid.prefix_tokens[:, min(1, sid.levels - 1)]
    tags[1:, 1] = v2 - 1 + sid.prefix_tokens[1:, -1]
    spec = DataSpec(
        n_items=items,
        user_feature_sizes=list(USER_FEATURES),
        signal_size=SIGNAL_SIZE,
        item_category=category,
        n_categories=branching[0] + 1,
        item_tags=tags,
        n_tags=int(tags.max()) + 1,
    )
    topic_items, topic_cdf = [], []
    for t in range(branching[0]):
        members = rng.permutation(ids[top == t])  # popularity order inside the topic
        topic_items.append(members)
        topic_cdf.append(_zipf_cdf(len(members), zipf) if len(members) else np.ones(0))
    return Catalogue(spec, sid, topic_items, topic_cdf, _zipf_cdf(items, zipf), rng.permutation(ids))


def _draw(cdf: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return pool[np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(pool) - 1)]


def synthetic_histories(
    cat: Catalogue, users: int, length: int, rng: np.random.Generator, topics_per_user: int = 3, explore: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Histories (users, length) of items and signals, user features (users, F), and each
    user's interest topics (users, K): Zipf within a few topics per user, some exploration."""
    n_topics = len(cat.topic_items)
    nonempty = np.array([len(t) > 0 for t in cat.topic_items])
    k = min(topics_per_user, int(nonempty.sum()))
    interests = np.stack([rng.choice(np.flatnonzero(nonempty), size=k, replace=False) for _ in range(users)])  # (U, K)
    cum = np.cumsum(rng.dirichlet(np.ones(k), size=users), axis=1)  # (U, K)
    slot = (rng.random((users, length, 1)) > cum[:, None, :-1]).sum(-1)  # (U, T) in 0..K-1
    topic = np.take_along_axis(interests, slot, axis=1)  # (U, T)
    hist = np.empty((users, length), dtype=np.int64)
    for t in range(n_topics):
        sel = topic == t
        if sel.any():
            hist[sel] = _draw(cat.topic_cdf[t], cat.topic_items[t], int(sel.sum()), rng)
    wander = rng.random((users, length)) < explore
    hist[wander] = _draw(cat.global_cdf, cat.global_items, int(wander.sum()), rng)
    main = interests[np.arange(users), 0]
    liked = np.asarray(cat.spec.item_category)[hist] - 1 == main[:, None]
    signal = np.where(liked, rng.integers(3, 6, hist.shape), rng.integers(1, 5, hist.shape)).astype(np.int64)
    feats = np.stack([rng.integers(1, size, users) for size in USER_FEATURES], axis=1).astype(np.int64)
    return hist, signal, feats, interests


def draw_candidates(cat: Catalogue, interests: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` candidate items for one user: half from the user's topics, half from popularity."""
    own = n // 2
    topic = interests[rng.integers(0, len(interests), own)]
    out = np.empty(n, dtype=np.int64)
    for i, t in enumerate(topic):
        out[i] = _draw(cat.topic_cdf[t], cat.topic_items[t], 1, rng)[0]
    out[own:] = _draw(cat.global_cdf, cat.global_items, n - own, rng)
    return out


def request_batch(
    hist: np.ndarray, signal: np.ndarray, feats: np.ndarray, candidates: np.ndarray, user: int, shared: bool = True
) -> Batch:
    """One serving request: ``len(candidates)`` rows over ONE history (T,).

    ``shared``: the rows are ``expand``-ed views of one tensor (stride 0, nothing copied);
    otherwise the history is copied once per row, for a model that cannot take a view.
    """
    b, t = len(candidates), len(hist)

    def rows(x: np.ndarray) -> torch.Tensor:
        one = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0)  # (1, ...)
        return one.expand(b, *one.shape[1:]) if shared else one.repeat(b, *([1] * (one.dim() - 1)))

    return Batch(
        user=torch.full((b,), user, dtype=torch.long),
        user_feats=rows(feats),
        target=torch.from_numpy(candidates.astype(np.int64)),
        hist_items=rows(hist),
        hist_signal=rows(signal),
        hist_mask=rows(np.ones(t, dtype=bool)),
        label=torch.zeros(b),
    )


def training_batch(
    hist: np.ndarray, signal: np.ndarray, feats: np.ndarray, targets: np.ndarray, labels: np.ndarray
) -> Batch:
    """A training batch: every sample has its own history (B, T)."""
    return Batch(
        user=torch.arange(len(hist)),
        user_feats=torch.from_numpy(feats),
        target=torch.from_numpy(targets.astype(np.int64)),
        hist_items=torch.from_numpy(hist),
        hist_signal=torch.from_numpy(signal),
        hist_mask=torch.ones(hist.shape, dtype=torch.bool),
        label=torch.from_numpy(labels.astype(np.float32)),
    )


@dataclass
class Workload:
    """The inputs at one history length, the same for every model: requests (a user's history
    and candidates), the users' kept states (built on first use, shared by the models: each
    model keeps its own index in a state) and a training batch."""

    t: int
    users: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # hist, signal, feats
    requests: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # hist, signal, feats, candidates
    train: Batch
    distinct_items: float  # mean distinct items in a request's history
    spec: object = None
    _states: dict = field(default_factory=dict)

    def request(self, i: int, shared: bool) -> Batch:
        """Request ``i`` as a batch: C rows holding the user's history (the batch path's input)."""
        hist, signal, feats, candidates = self.requests[i % len(self.requests)]
        return request_batch(hist, signal, feats, candidates, user=i, shared=shared)

    def state(self, i: int) -> UserState:
        """The kept state of request ``i``'s user."""
        u = (i % len(self.requests)) % len(self.users)
        if u not in self._states:
            hist, signal, feats = self.users[u]
            spec = self.spec
            self._states[u] = UserState(
                hist, signal, feats, spec.n_items, spec.signal_size, len(spec.user_feature_sizes)
            )
        return self._states[u]


USERS_BUDGET = 4_000_000  # behaviours held per length: long histories come from fewer users


def make_workload(cat: Catalogue, t: int, n_requests: int, candidates: int, train_batch: int, seed: int) -> Workload:
    """``n_requests`` requests from min(n_requests, max(2, 4M / t)) users (their histories are
    held in memory with every model's state), each with its own candidates."""
    rng = np.random.default_rng([seed, t])
    n_users = min(n_requests, max(2, USERS_BUDGET // t))
    hist, signal, feats, interests = synthetic_histories(cat, n_users, t, rng)
    users = [(hist[u], signal[u], feats[u]) for u in range(n_users)]
    requests = [
        (*users[i % n_users], draw_candidates(cat, interests[i % n_users], candidates, rng)) for i in range(n_requests)
    ]
    distinct = float(np.mean([len(np.unique(h)) for h in hist]))
    hist, signal, feats, interests = synthetic_histories(cat, train_batch, min(t, TRAIN_T_MAX), rng)
    targets = np.array([draw_candidates(cat, interests[i], 2, rng)[i % 2] for i in range(train_batch)])
    labels = (rng.random(train_batch) < 0.3).astype(np.float32)
    return Workload(t, users, requests, training_batch(hist, signal, feats, targets, labels), distinct, cat.spec)


# ---- models --------------------------------------------------------------------------------
def bench_model_config(name: str):
    """The shared bench config: d = 32, short window 20; R2LED k = 20 per route (x 3 routes),
    a baseline with a retrieval budget ``k`` keeps the same R*k = 60 behaviours. A name in
    ``VARIANTS`` is its model with the variant's settings (``"r2led[mha]"``)."""
    name, extra = VARIANTS.get(name, (name, {}))
    cls = model_class(name).config_class
    values = {"name": name, "dim": 32, "short_len": 20, **extra}
    if "k" in cls.model_fields:
        values["k"] = 20 if name == REFERENCE else 60
    return cls.model_validate(values)


def other_encoder() -> str:
    """The R2LED variant with the per-route encoder the default config does not use."""
    default = model_class(REFERENCE).config_class().attention
    return next(v for v, (_, extra) in VARIANTS.items() if extra.get("attention", default) != default)


def r2led_floor_name(name: str) -> str:
    """The floor of an R2LED contender: "floor" for the default config (served either way),
    "floor[mha]" for a variant with other settings."""
    return "floor" + name[len(REFERENCE) :] if VARIANTS.get(name, ("", {}))[1] else "floor"
