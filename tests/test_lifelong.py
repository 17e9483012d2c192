"""synthetic-lifelong: planted long-range interests, the Bayes ceiling and the history oracle."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from r2led.cli import app
from r2led.data.protocol import Protocol
from r2led.data.sources import load_source
from r2led.data.sources.lifelong import _world, ceiling_auc, history_oracle, load_lifelong, true_click_probability
from r2led.data.sources.synthetic import load_synthetic
from r2led.data.store import build_store
from r2led.errors import ConfigError, DataError

TINY = dict(users=40, length=2000, items=1000, topics=(4, 4, 16), interests=24, seed=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tables = load_lifelong(**TINY)
    return build_store(tables, tmp_path_factory.mktemp("ll") / "s", Protocol(samples_last_n=60))


def test_a_long_history_oracle_beats_a_short_one(store):
    idx = np.arange(store.samples.height)  # every sample (all splits), for a stable estimate
    label = store.sample_arrays["label"][idx]
    auc = {t: roc_auc_score(label, history_oracle(store, idx, t)) for t in (30, 300, 3000)}
    assert auc[300] > auc[30] + 0.02, auc
    assert auc[3000] > auc[300] + 0.01, auc
    truth = true_click_probability(store)
    s = store.sample_arrays
    ceiling = roc_auc_score(label, truth[store.offsets[s["user"]] + s["pos"]])
    assert ceiling > auc[3000], (ceiling, auc)


def test_true_probabilities_are_aligned_with_the_stored_rows(store):
    p = true_click_probability(store)
    clicked = store.seq_signal[:] == 5
    assert set(np.unique(store.seq_signal[:]).tolist()) == {1, 5}
    # calibration: the realised click rate matches the probabilities, overall and by decile
    assert abs(p.mean() - clicked.mean()) < 0.01
    bins = np.quantile(p, [0.0, 0.5, 1.0])
    low, high = p <= bins[1], p > bins[1]
    assert abs(p[low].mean() - clicked[low].mean()) < 0.02 and abs(p[high].mean() - clicked[high].mean()) < 0.02
    assert 0.5 < ceiling_auc(store) < 1.0


def test_the_last_thirty_behaviours_show_only_a_few_of_the_interests(store):
    w = _world(
        **{k: TINY[k] for k in ("users", "length", "items", "seed", "topics", "interests")}, zipf=1.1, min_length=6
    )
    keys = store.items["key"].cast(pl.Int64).to_numpy()
    leaf = np.concatenate([[-1], w.item_leaf[keys - 1]])
    user_key = store.users["key"].cast(pl.Int64).to_numpy()
    recent, whole = [], []
    for u in range(store.n_users):
        items = store.user_sequence(u)[0]
        interests = set(w.interests[user_key[u] - 1].tolist())
        recent.append(len(interests & set(leaf[items[-30:]].tolist())) / len(interests))
        whole.append(len(interests & set(leaf[items].tolist())) / len(interests))
    assert np.mean(recent) < 0.4 and np.mean(whole) > 0.95, (np.mean(recent), np.mean(whole))


def test_lazy_and_eager_generation_agree_and_the_registry_knows_the_source():
    small = dict(TINY, users=8, length=300)
    eager = load_lifelong(**small)
    lazy = load_source("synthetic-lifelong", lazy=True, **small)
    assert lazy.interactions.collect().equals(eager.interactions)
    assert eager.items.equals(lazy.items) and eager.users.equals(lazy.users)
    assert eager.items["tags"].list.len().unique().to_list() == [3]  # top, sub, leaf: SIDs from text or tags
    assert not load_lifelong(**dict(small, seed=4)).interactions.equals(eager.interactions)


def test_bad_settings_and_foreign_stores_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="interests=300 exceeds the 256 leaves"):
        load_lifelong(**dict(TINY, interests=300))
    with pytest.raises(ConfigError, match="focus and recall"):
        load_lifelong(**dict(TINY, focus=0.8, recall=0.3))
    other = build_store(load_synthetic(users=10, length=20, items=100), tmp_path / "syn")
    with pytest.raises(DataError, match="not prepared from synthetic-lifelong"):
        ceiling_auc(other)


def test_bench_history_takes_its_settings_from_set_and_options(store, tmp_path):
    out = tmp_path / "hist"
    args = ["bench", "history", str(store.root), "--out", str(out), "--t-max", "30,300", "--report-only"]
    result = CliRunner().invoke(app, [*args, "--set", "bench.models=din,eta", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    curve = json.loads((out / "curve.json").read_text())
    assert curve["seeds"] == 2 and set(curve["models"]) == {"din", "eta"}
    meta = json.loads((out / "t30" / "results.json").read_text())["meta"]
    # the history benchmark's own defaults (no ablations) and train.t_max per T
    assert meta["models"] == ["din", "eta"] and meta["seeds"] == [0, 1] and "train.t_max=30" in meta["overrides"]
    bad = CliRunner().invoke(app, [*args, "--set", "bench.seeds=0"])
    assert bad.exit_code == 2 and "bench.seeds = 0 is out of range" in bad.output
