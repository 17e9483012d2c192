"""Export and serving on the tiny store: round trip, trainer parity, input errors, HTTP API, CLI."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from r2led.cli import app as cli_app
from r2led.config import load_config
from r2led.data.batches import Batch
from r2led.errors import CheckpointError
from r2led.serve import ScoringInputError, ScoringModel, UnknownItemError, UnknownUserError, export_run, load_exported
from r2led.serve.service import create_app
from r2led.train.trainer import Trainer, load_run, predict

# t_max 1024 (> any tiny history, so training is unchanged) lets a request carry 1,000 behaviours.
FAST = ["train.lr=0.01", "train.batch_size=64", "train.eval_batch_size=256", "train.t_max=1024", "model.dim=16", "train.threads=1", "train.epochs=1"]
T_MAX = 1024


def train(store, out, model: str) -> None:
    extra = ["model.k=5"] if model == "r2led" else []
    cfg = load_config(None, [*FAST, *extra], base={"model": {"name": model}})
    Trainer(store.root, cfg, out, show_progress=False).fit()


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    train(tiny_store, out, "r2led")
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export_run(run, tmp_path_factory.mktemp("export") / "model")


@pytest.fixture
def scoring(exported) -> ScoringModel:
    return load_exported(exported)


def sample_history(store, i: int) -> tuple[str, list[str], list[int]]:
    """Sample i's user key, history item keys and signals (oldest first), from the store."""
    s = store.sample_arrays
    user, pos = int(s["user"][i]), int(s["pos"][i])
    items, signals, _ = store.user_sequence(user)
    keys = store.items.sort("item")["key"].to_list()
    return store.users.sort("user")["key"][user], [keys[j - 1] for j in items[:pos]], [int(x) for x in signals[:pos]]


def item_key(store, item_id: int) -> str:
    return store.items.sort("item")["key"][int(item_id) - 1]


# ---- export -------------------------------------------------------------------------------
def test_export_folder_is_self_contained_and_described(run, exported, tiny_store):
    for name in ("model.pt", "config.yaml", "spec.json", "items.parquet", "users.parquet", "vocab.json", "manifest.json", "sid/meta.json"):
        assert (exported / name).is_file(), name
    manifest = json.loads((exported / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert manifest["model"] == "r2led" and manifest["t_max"] == T_MAX and manifest["items"] == tiny_store.n_items
    assert manifest["metrics"]["test"] == metrics["test"] and manifest["source_run"] == str(run.resolve())
    assert set(torch.load(exported / "model.pt", weights_only=True)) == set(load_run(run)[0].state_dict())
    assert not list(exported.parent.glob(".*tmp*"))  # nothing half-written left behind


def test_export_refuses_to_overwrite_without_force(run, exported, tmp_path):
    with pytest.raises(CheckpointError, match="already holds an exported model"):
        export_run(run, exported)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an exported model"):
        export_run(run, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_export_load_round_trip_gives_identical_scores(run, exported, tiny_store, scoring):
    model, store, cfg = load_run(run)
    direct = ScoringModel(
        model, store.items.sort("item")["key"].to_list(), store.users.sort("user")["key"].to_list(),
        store.user_features, {k: v for k, v in store.vocab["user_features"].items()}, cfg.train.t_max,
    )
    user, items, signals = sample_history(tiny_store, int(tiny_store.split_indices("test")[0]))
    candidates = [item_key(tiny_store, i) for i in range(1, tiny_store.n_items + 1)]
    for s in (direct, scoring):
        s.set_history(user, items, signals)
    assert np.array_equal(direct.score(user, candidates), scoring.score(user, candidates))


def test_loading_warms_the_model_up_so_the_first_request_finds_its_caches(scoring):
    assert scoring.name == "r2led" and scoring.info["warm_up_s"] > 0
    assert scoring.model._tables_cache._entry is not None  # per-item tables built by the warm-up, before any request


def test_model_without_sid_exports_without_sid_folder(tiny_store, tmp_path):
    train(tiny_store, tmp_path / "run", "din")
    out = export_run(tmp_path / "run", tmp_path / "din")
    assert not (out / "sid").exists()
    scoring = load_exported(out)
    assert scoring.name == "din" and scoring.score(tiny_store.users["key"][0], ["i1", "i2"]).shape == (2,)


# ---- scoring equals the trainer ---------------------------------------------------------------
def test_score_equals_trainer_predict_on_test_samples(run, tiny_store, scoring):
    model, store, cfg = load_run(run)
    test_idx = tiny_store.split_indices("test")
    lengths = tiny_store.sample_arrays["pos"][test_idx]
    # a few samples with different history lengths (so predict pads some of them)
    chosen = test_idx[np.unique(lengths, return_index=True)[1][:6]]
    together = predict(model, store, chosen, cfg.train.eval_batch_size, cfg.train.t_max)
    for i, p_batch in zip(chosen, together):
        user, items, signals = sample_history(tiny_store, int(i))
        scoring.set_history(user, items, signals)
        target = item_key(tiny_store, tiny_store.sample_arrays["target"][i])
        served = scoring.score(user, [target, "i0"])[0]
        alone = predict(model, store, np.array([i]), cfg.train.eval_batch_size, cfg.train.t_max)[0]
        assert served == pytest.approx(alone, abs=1e-5)
        assert served == pytest.approx(p_batch, abs=1e-5)


def test_long_history_request_equals_the_batch_path(scoring):
    # 1,000 behaviours: R2LED takes its shared-history serving path; the same rows as an
    # ordinary (copied) batch take the batch path. Both must give the same probabilities.
    rng = np.random.default_rng(0)
    hist = rng.integers(1, scoring.n_items + 1, 1000)
    sig = rng.integers(1, scoring.signal_max + 1, 1000)
    scoring.set_history("long", [scoring.item_keys[i - 1] for i in hist], sig.tolist())
    candidates = scoring.item_keys[:50]
    served = scoring.score("long", candidates)
    c = len(candidates)
    batch = Batch(
        user=torch.full((c,), -1), user_feats=torch.zeros((c, len(scoring.feature_names)), dtype=torch.long),
        target=torch.arange(1, c + 1), hist_items=torch.from_numpy(hist).repeat(c, 1), hist_signal=torch.from_numpy(sig).repeat(c, 1),
        hist_mask=torch.ones((c, 1000), dtype=torch.bool), label=torch.zeros(c),
    )
    with torch.no_grad():
        expected = torch.sigmoid(scoring.model(batch)).double().numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


# ---- histories ------------------------------------------------------------------------------
def test_oversize_history_keeps_the_most_recent_t_max(scoring):
    keys = [scoring.item_keys[i % scoring.n_items] for i in range(T_MAX + 10)]
    out = scoring.set_history("u0", keys, [1] * len(keys))
    assert out["length"] == T_MAX and out["dropped"] == 10 and "kept the most recent 1024" in out["note"]
    assert scoring.history("u0")[0] == keys[10:]
    scoring.append("u0", "i5", 4)
    items, signals = scoring.history("u0")
    assert len(items) == T_MAX and items[-1] == "i5" and signals[-1] == 4 and items[0] == keys[11]


def test_load_histories_preloads_every_user(scoring, tiny_store):
    assert scoring.load_histories(tiny_store) == tiny_store.n_users
    items, signals = scoring.history("u3")
    seq_items, seq_signal, _ = tiny_store.user_sequence(3)
    assert items == [item_key(tiny_store, i) for i in seq_items] and signals == seq_signal.tolist()


def test_users_known_new_and_unknown(scoring, tiny_store):
    # in the user table, no history: scored with an empty history
    assert np.isfinite(scoring.score("u1", ["i1", "i2"])).all()
    # never seen: refused rather than scored as a silent typo
    with pytest.raises(UnknownUserError, match="'stranger'"):
        scoring.score("stranger", ["i1"])
    # a new user starts with its first event (features "unknown")
    scoring.append("stranger", "i3", 5)
    assert scoring.score("stranger", ["i1"]).shape == (1,)


def test_features_are_encoded_by_vocabulary(scoring):
    base = scoring.score("u1", ["i1", "i2", "i3"])
    out = scoring.set_history("u1", [], [], {"segment": "s2"})
    assert "unknown_features" not in out
    assert not np.array_equal(scoring.score("u1", ["i1", "i2", "i3"]), base)  # u1 is segment s1
    out = scoring.set_history("u1", [], [], {"segment": "s9"})
    assert out["unknown_features"] == {"segment": "s9"}
    with pytest.raises(ScoringInputError, match="unknown user feature 'age'"):
        scoring.set_history("u1", [], [], {"age": 3})


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda s: s.score("u1", ["i1", "nope"]), UnknownItemError, "unknown item key 'nope'"),
        (lambda s: s.score("u1", []), ScoringInputError, "candidates is empty"),
        (lambda s: s.score("u1", ["i1"] * 1001), ScoringInputError, "1001 candidates exceed the limit of 1000"),
        (lambda s: s.set_history("u1", ["i1", "i2"], [3, 9]), ScoringInputError, r"signal 9 \(position 1\) is out of range: expected 1..5"),
        (lambda s: s.set_history("u1", ["i1", "i2"], [3]), ScoringInputError, "2 items, 1 signals"),
        (lambda s: s.set_history("u1", ["i1", "zz"], [3, 3]), UnknownItemError, "'zz'"),
        (lambda s: s.append("u1", "i1", 0), ScoringInputError, "signal 0 is out of range"),
    ],
)
def test_bad_input_is_refused_naming_the_value(scoring, call, error, message):
    with pytest.raises(error, match=message):
        call(scoring)
    assert issubclass(error, ValueError)


# ---- corrupt exports ----------------------------------------------------------------------------
def corrupted_copy(exported, tmp_path, name: str, content: bytes | None):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    if content is None:
        (out / name).unlink()
    else:
        (out / name).write_bytes(content)
    return out


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("model.pt", b"not a state dict", "model.pt is corrupt"),
        ("model.pt", None, "model.pt is missing"),
        ("spec.json", b"{\"n_items\": 3", "spec.json is corrupt"),
        ("config.yaml", b"model:\n  name: r2led\n  k: -4\n", "config.yaml is corrupt"),
        ("items.parquet", b"PAR1 broken", "items.parquet is corrupt"),
        ("manifest.json", None, "manifest.json is missing"),
    ],
)
def test_missing_or_corrupt_file_raises_checkpoint_error_naming_it(exported, tmp_path, name, content, message):
    with pytest.raises(CheckpointError, match=message):
        load_exported(corrupted_copy(exported, tmp_path, name, content))


def test_weights_of_another_model_are_refused(exported, tmp_path):
    out = corrupted_copy(exported, tmp_path, "model.pt", b"")
    torch.save({"head.weight": torch.zeros(2, 2)}, out / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt does not fit the model"):
        load_exported(out)


# ---- HTTP service ----------------------------------------------------------------------------
@pytest.fixture
def client(scoring):
    with TestClient(create_app(scoring)) as c:
        yield c


def test_health(client, tiny_store):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "r2led" and body["items"] == tiny_store.n_items and body["users"] == 0


def test_history_events_and_score(client):
    r = client.put("/users/u2/history", json={"items": ["i2", "i6", "i10"], "signals": [5, 4, 5], "features": {"segment": "s2"}})
    assert r.status_code == 200 and r.json() == {"user": "u2", "length": 3, "dropped": 0}
    assert client.get("/health").json()["users"] == 1
    first = client.post("/score", json={"user": "u2", "candidates": ["i2", "i3", "i2"]})
    assert first.status_code == 200
    body = first.json()
    assert len(body["scores"]) == 3 and body["scores"][0] == body["scores"][2] and body["latency_ms"] > 0
    assert body["history_length"] == 3
    for item in ("i3", "i7", "i11"):
        r = client.post("/users/u2/events", json={"item": item, "signal": 5})
        assert r.status_code == 200
    assert r.json()["length"] == 6
    after = client.post("/score", json={"user": "u2", "candidates": ["i2", "i3", "i2"]}).json()
    assert after["scores"] != body["scores"] and after["history_length"] == 6


def test_service_errors_name_the_bad_value(client, scoring):
    client.put("/users/u1/history", json={"items": ["i1"], "signals": [3]})
    r = client.post("/score", json={"user": "u1", "candidates": ["i1", "no-such-item"]})
    assert r.status_code == 404 and "no-such-item" in r.json()["detail"]
    r = client.post("/score", json={"user": "nobody", "candidates": ["i1"]})
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
    r = client.post("/score", json={"user": "u1", "candidates": []})
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post("/score", json={"user": "u1", "candidates": ["i1"] * (scoring.max_candidates + 1)})
    assert r.status_code == 422 and "limit of 1000" in r.json()["detail"]
    r = client.put("/users/u1/history", json={"items": ["i1"], "signals": [42]})
    assert r.status_code == 422 and "signal 42" in r.json()["detail"]
    r = client.post("/users/u1/events", json={"item": "i1", "signal": "high"})
    assert r.status_code == 422 and "body.signal" in r.json()["detail"] and "'high'" in r.json()["detail"]
    r = client.post("/score", json={"user": "u1"})
    assert r.status_code == 422 and "body.candidates" in r.json()["detail"]


def test_scoring_latency_100_candidates_history_1000(client, scoring):
    """Median service latency over 50 requests (printed; run with -s to see it)."""
    rng = np.random.default_rng(1)
    hist = rng.integers(1, scoring.n_items + 1, 1000)
    client.put("/users/bench/history", json={"items": [scoring.item_keys[i - 1] for i in hist], "signals": [3] * 1000})
    candidates = [scoring.item_keys[i % scoring.n_items] for i in range(100)]
    client.post("/score", json={"user": "bench", "candidates": candidates})  # warm-up (signature cache)
    wall, model_ms = [], []
    for _ in range(50):
        t0 = time.perf_counter()
        body = client.post("/score", json={"user": "bench", "candidates": candidates}).json()
        wall.append((time.perf_counter() - t0) * 1000)
        model_ms.append(body["latency_ms"])
    print(f"\nscore latency, 100 candidates x history 1000: median {statistics.median(wall):.2f} ms per request "
          f"(TestClient round trip), {statistics.median(model_ms):.2f} ms scoring in the service")
    assert statistics.median(wall) < 2000


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_export_and_serve(run, tiny_store, tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "exported"
    res = runner.invoke(cli_app, ["export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "exported r2led" in res.output and (out / "manifest.json").is_file()
    res = runner.invoke(cli_app, ["export", str(run), "--out", str(out)])
    assert isinstance(res.exception, CheckpointError)
    assert runner.invoke(cli_app, ["export", str(run), "--out", str(out), "--force"]).exit_code == 0

    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: served.update(app=app, host=host, port=port))
    res = runner.invoke(cli_app, ["serve", str(out), "--port", "8123", "--store", str(tiny_store.root)])
    assert res.exit_code == 0, res.output
    assert served["port"] == 8123 and served["host"] == "127.0.0.1"
    with TestClient(served["app"]) as c:
        assert c.get("/health").json()["users"] == tiny_store.n_users
