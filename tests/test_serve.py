"""Export bundles and scoring on the tiny store: round trip, hashes, trainer parity, input
errors, the HTTP API with its limits and keys, and the CLI."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from r2led.cli import app as cli_app
from r2led.config import load_config
from r2led.data.batches import Batch
from r2led.errors import CheckpointError, DataError
from r2led.serve import (
    BundleError,
    ScoringInputError,
    ScoringModel,
    ScoringService,
    UnknownItemError,
    UnknownUserError,
    export_run,
    load_bundle,
    open_store,
)
from r2led.serve.bundle import sha256_file
from r2led.serve.limits import Limits
from r2led.serve.service import create_app
from r2led.train.trainer import Trainer, load_run, predict

# t_max 1024 (> any tiny history, so training is unchanged) lets a request carry 1,000 behaviours.
FAST = [
    "train.lr=0.01",
    "train.batch_size=64",
    "train.eval_batch_size=256",
    "train.t_max=1024",
    "model.dim=16",
    "train.threads=1",
    "train.epochs=1",
]
T_MAX = 1024
KEY = "k" * 20 + "-first"


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


@pytest.fixture(scope="module")
def model(exported) -> ScoringModel:
    return load_bundle(exported)


@pytest.fixture
def service(model, tmp_path) -> ScoringService:
    return ScoringService(model, open_store(str(tmp_path / "h.db"), model.t_max))


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
def test_bundle_is_self_contained_and_lists_every_file_hash(run, exported, tiny_store):
    from r2led.train.run_folder import run_fingerprints

    manifest = json.loads((exported / "manifest.json").read_text())
    files = sorted(
        p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(manifest["files"]) == files and "sid/meta.json" in files and "model.pt" in files
    for name, digest in manifest["files"].items():
        assert sha256_file(exported / name) == digest
    metrics = json.loads((run / "metrics.json").read_text())
    assert manifest["model"] == "r2led" and manifest["t_max"] == T_MAX and manifest["items"] == tiny_store.n_items
    assert manifest["metrics"]["test"] == metrics["test"] and manifest["finished"] is True
    assert manifest["fingerprints"] == run_fingerprints(run) and manifest["fingerprints"]["sid"]
    assert set(torch.load(exported / "model.pt", weights_only=True)) == set(load_run(run)[0].state_dict())
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # nothing half-written left behind


def test_export_refuses_to_overwrite_without_force(run, exported, tmp_path):
    with pytest.raises(CheckpointError, match="already holds an exported model"):
        export_run(run, exported)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an exported model"):
        export_run(run, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_export_refuses_an_unfinished_run_unless_asked(run, tmp_path):
    unfinished = tmp_path / "run"
    shutil.copytree(run, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match=r"unfinished \(no metrics.json\).*--resume.*--allow-unfinished"):
        export_run(unfinished, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    out = export_run(unfinished, tmp_path / "b", allow_unfinished=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] is False and manifest["metrics"] == {}


def test_export_refuses_a_run_whose_sid_table_changed(run, tiny_store, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_store.root, data)
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    text = (moved / "config.yaml").read_text().replace(str(tiny_store.root.resolve()), str(data.resolve()))
    (moved / "config.yaml").write_text(text)
    export_run(moved, tmp_path / "ok")  # same bytes elsewhere: fine
    codes = np.load(data / "sid" / "codes.npy")
    np.save(data / "sid" / "codes.npy", codes[::-1].copy())
    with pytest.raises(DataError, match="SID table .* was rebuilt"):
        export_run(moved, tmp_path / "b")


def test_bundle_round_trip_gives_identical_scores(run, exported, tiny_store, model):
    trained, store, cfg = load_run(run)
    user, items, signals = sample_history(tiny_store, int(tiny_store.split_indices("test")[0]))
    candidates = np.arange(1, tiny_store.n_items + 1)
    keys = store.items.sort("item")["key"].to_list()
    direct = ScoringModel(
        trained,
        keys,
        store.users.sort("user")["key"].to_list(),
        store.user_features,
        dict(store.vocab["user_features"]),
        cfg.train.t_max,
    )
    args = (model.user_row(user), model.feature_codes(user, {}), model.item_ids(items), np.asarray(signals), candidates)
    assert np.array_equal(direct.score(*args), model.score(*args))


def test_loading_warms_the_model_up(model):
    assert model.name == "r2led" and model.info["warm_up_s"] > 0


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("model.pt", b"not a state dict", "model.pt does not match its sha256"),
        ("model.pt", None, "model.pt is missing"),
        ("spec.json", b'{"n_items": 3', "spec.json does not match its sha256"),
        ("sid/codes.npy", b"", "codes.npy does not match its sha256"),
        ("items.parquet", b"PAR1 broken", "items.parquet does not match"),
        ("manifest.json", None, "manifest.json is missing"),
        ("manifest.json", b'{"format": 1}', "format 1 export without file hashes"),
    ],
)
def test_altered_or_missing_file_is_refused_naming_it(exported, tmp_path, name, content, message):
    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    if content is None:
        (out / name).unlink()
    else:
        (out / name).write_bytes(content)
    with pytest.raises(BundleError, match=message):
        load_bundle(out)


# ---- scoring equals the trainer ---------------------------------------------------------------
def test_score_equals_trainer_predict_on_test_samples(run, tiny_store, service):
    trained, store, cfg = load_run(run)
    test_idx = tiny_store.split_indices("test")
    lengths = tiny_store.sample_arrays["pos"][test_idx]
    chosen = test_idx[np.unique(lengths, return_index=True)[1][:6]]  # different history lengths
    together = predict(trained, store, chosen, cfg.train.eval_batch_size, cfg.train.t_max)
    for i, p_batch in zip(chosen, together, strict=False):
        user, items, signals = sample_history(tiny_store, int(i))
        service.set_history(user, items, signals)
        target = item_key(tiny_store, tiny_store.sample_arrays["target"][i])
        served = service.score(user, [target, "i0"]).scores[0]
        alone = predict(trained, store, np.array([i]), cfg.train.eval_batch_size, cfg.train.t_max)[0]
        assert served == pytest.approx(alone, abs=1e-5) and served == pytest.approx(p_batch, abs=1e-5)


def test_long_history_request_equals_the_batch_path(service, model):
    rng = np.random.default_rng(0)
    hist = rng.integers(1, model.n_items + 1, 1000)
    sig = rng.integers(1, model.signal_max + 1, 1000)
    service.set_history("long", [model.item_keys[i - 1] for i in hist], sig.tolist())
    served = service.score("long", model.item_keys[:50]).scores
    c = 50
    batch = Batch(
        user=torch.full((c,), -1),
        user_feats=torch.zeros((c, len(model.feature_names)), dtype=torch.long),
        target=torch.arange(1, c + 1),
        hist_items=torch.from_numpy(hist).repeat(c, 1),
        hist_signal=torch.from_numpy(sig).repeat(c, 1),
        hist_mask=torch.ones((c, 1000), dtype=torch.bool),
        label=torch.zeros(c),
    )
    with torch.no_grad():
        expected = torch.sigmoid(model.model(batch)).double().numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


# ---- histories ------------------------------------------------------------------------------
def test_history_keeps_the_most_recent_t_max(service, model):
    keys = [model.item_keys[i % model.n_items] for i in range(T_MAX + 10)]
    out = service.set_history("u0", keys, [1] * len(keys))
    assert out == {"user": "u0", "length": T_MAX, "dropped": 10}
    assert service.history("u0")[0] == keys[10:]
    assert service.append("u0", ["i5", "i6"], [4, 2]) == {"user": "u0", "length": T_MAX}
    items, signals = service.history("u0")
    assert len(items) == T_MAX and items[-2:] == ["i5", "i6"] and signals[-2:] == [4, 2] and items[0] == keys[12]
    assert service.score("u0", ["i1"]).history_length == T_MAX


def test_preload_writes_every_user_and_checks_the_data(service, tiny_store):
    assert service.preload(tiny_store) == tiny_store.n_users
    items, signals = service.history("u3")
    seq_items, seq_signal, _ = tiny_store.user_sequence(3)
    assert items == [item_key(tiny_store, i) for i in seq_items] and signals == seq_signal.tolist()


def test_users_known_new_and_unknown(service):
    assert np.isfinite(service.score("u1", ["i1", "i2"]).scores).all()  # in the table, no history
    with pytest.raises(UnknownUserError, match="'stranger'"):
        service.score("stranger", ["i1"])
    service.append("stranger", ["i3"], [5])
    assert service.score("stranger", ["i1"]).history_length == 1


def test_features_are_encoded_by_vocabulary(service):
    base = service.score("u1", ["i1", "i2", "i3"]).scores
    assert "unknown_features" not in service.set_history("u1", [], [], {"segment": "s2"})
    assert not np.array_equal(service.score("u1", ["i1", "i2", "i3"]).scores, base)  # u1 is segment s1
    assert service.set_history("u1", [], [], {"segment": "s9"})["unknown_features"] == {"segment": "s9"}
    with pytest.raises(ScoringInputError, match="unknown user feature 'age'"):
        service.set_history("u1", [], [], {"age": 3})


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda s: s.score("u1", ["i1", "nope"]), UnknownItemError, "unknown item key 'nope'"),
        (lambda s: s.score("u1", []), ScoringInputError, "candidates is empty"),
        (lambda s: s.score("u1", ["i1"] * 1001), ScoringInputError, "1001 candidates exceed the limit of 1000"),
        (
            lambda s: s.set_history("u1", ["i1", "i2"], [3, 9]),
            ScoringInputError,
            r"signal 9 \(position 1\) is out of range: expected 1..5",
        ),
        (lambda s: s.set_history("u1", ["i1", "i2"], [3]), ScoringInputError, "2 items, 1 signals"),
        (lambda s: s.set_history("u1", ["i1", "zz"], [3, 3]), UnknownItemError, "'zz'"),
        (lambda s: s.append("u1", ["i1"], [0]), ScoringInputError, "signal 0 is out of range"),
        (lambda s: s.score("u1", ["x" * 10_000]), UnknownItemError, r"'xxxx.*\.\.\. \(10,002 chars\)"),
    ],
)
def test_bad_input_is_refused_naming_the_value(service, call, error, message):
    with pytest.raises(error, match=message) as info:
        call(service)
    assert len(str(info.value)) < 200


# ---- HTTP service ----------------------------------------------------------------------------
@pytest.fixture
def client(service):
    with TestClient(
        create_app(service, Limits(max_candidates=1000, max_events=5, max_key_length=64, max_body_bytes=200_000))
    ) as c:
        yield c


def events(*pairs):
    return [{"item": i, "signal": s} for i, s in pairs]


def test_health(client, tiny_store):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "r2led" and body["items"] == tiny_store.n_items
    assert body["users_in_store"] == 0 and body["limits"]["max_events"] == 5


def test_history_events_and_score(client):
    r = client.put(
        "/users/u2/history", json={"events": events(("i2", 5), ("i6", 4), ("i10", 5)), "features": {"segment": "s2"}}
    )
    assert r.status_code == 200 and r.json() == {"user": "u2", "length": 3, "dropped": 0}
    assert client.get("/health").json()["users_in_store"] == 1
    first = client.post("/score", json={"user": "u2", "candidates": ["i2", "i3", "i2"]})
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    body = first.json()
    assert len(body["scores"]) == 3 and body["scores"][0] == body["scores"][2] and body["history_length"] == 3
    assert first.headers["server-timing"].startswith("model;dur=")
    r = client.post("/users/u2/events", json={"events": events(("i3", 5), ("i7", 5), ("i11", 5))})
    assert r.status_code == 200 and r.json() == {"user": "u2", "length": 6}
    got = client.get("/users/u2/history").json()
    assert got["length"] == 6 and [e["item"] for e in got["events"]] == ["i2", "i6", "i10", "i3", "i7", "i11"]
    after = client.post("/score", json={"user": "u2", "candidates": ["i2", "i3", "i2"]}).json()
    assert after["scores"] != body["scores"] and after["history_length"] == 6


def test_service_errors_are_short_and_name_the_bad_value(client):
    client.put("/users/u1/history", json={"events": events(("i1", 3))})
    cases = [
        (client.post("/score", json={"user": "u1", "candidates": ["i1", "no-such-item"]}), 404, "no-such-item"),
        (client.post("/score", json={"user": "nobody", "candidates": ["i1"]}), 404, "nobody"),
        (client.get("/users/nobody/history"), 404, "nobody"),
        (client.post("/score", json={"user": "u1", "candidates": []}), 422, "at least 1 item"),
        (client.post("/score", json={"user": "u1", "candidates": ["i1"] * 1001}), 422, "at most 1000 items"),
        (client.put("/users/u1/history", json={"events": events(("i1", 42))}), 422, "less than or equal to 5"),
        (client.post("/users/u1/events", json={"events": events(*[("i1", 3)] * 6)}), 422, "at most 5 items"),
        (
            client.post("/users/u1/events", json={"events": [{"item": "i1", "signal": "3"}]}),
            422,
            "valid integer (got '3')",
        ),
        (
            client.post("/users/u1/events", json={"events": [{"item": True, "signal": 3}]}),
            422,
            "body.events.0.item: Input should be a string or an integer (got True)",
        ),
        (
            client.post("/users/u1/events", json={"events": [{"item": "i1", "signal": 2.5}]}),
            422,
            "fractional part (got 2.5)",
        ),
        (client.post("/score", json={"user": "u1"}), 422, "body.candidates"),
        (
            client.post("/score", json={"user": "u1", "candidates": ["x" * 65]}),
            422,
            "body.candidates.0: String should have at most 64 characters",
        ),
        (client.get("/users/" + "u" * 65 + "/history"), 422, "at most 64 characters"),
        (client.put("/users/u1/history", json={"events": [], "features": {"age": "3"}}), 422, "features.age"),
        (
            client.post("/score", content=b"\xff\xfe{", headers={"content-type": "application/json"}),
            400,
            "not valid JSON",
        ),
        (
            client.post("/score", content=b"{" + b" " * 200_001 + b"}", headers={"content-type": "application/json"}),
            413,
            "200,000 bytes",
        ),
    ]
    for response, status, text in cases:
        detail = response.json()["detail"]
        assert response.status_code == status and isinstance(detail, str) and text in detail, (status, detail)
        assert len(detail) < 300
    # an unknown 50 KB key: the 404 quotes 40 characters of it, not the whole key
    big = client.put("/users/" + "y" * 60 + "/history", json={"events": events(("w" * 60, 3))})
    assert big.status_code == 404 and big.text.count("w") <= 45


SCORE_BODIES = [  # (body, handled by ScoreRoute itself)
    (b'{"user": "u1", "candidates": ["i1", "i2", "i1"]}', True),
    (b'{"candidates": ["i3"], "user": "u1"}', True),
    (b'{"user": "u1", "candidates": [7, "i2"]}', True),  # an integer key: unknown "7", 404
    (b'{"user": "u1", "candidates": ["i1", "nope"]}', True),  # 404
    (b'{"user": "nobody", "candidates": ["i1"]}', True),  # 404
    (b'{"user": "u1", "user": "u2", "candidates": ["i1"]}', True),  # the last duplicate wins, as in json
    ('{"user": "u1", "candidates": ["i1", "' + "x" * 64 + '"]}', True),  # the longest key: 404
    (b'{"user": "u1", "candidates": [7.0]}', False),  # a float key: the FastAPI route
    (b'{"user": "u1", "candidates": [2.5]}', False),
    (b'{"user": "u1", "candidates": [true]}', False),
    (b'{"user": "u1", "candidates": [null]}', False),
    (b'{"user": "u1", "candidates": [""]}', False),
    (b'{"user": "u1", "candidates": []}', False),
    (b'{"user": "u1", "candidates": ["i1", ["i2"]]}', False),
    ('{"user": "u1", "candidates": ["' + "x" * 65 + '"]}', False),
    ('{"user": "' + "u" * 65 + '", "candidates": ["i1"]}', False),
    (b'{"user": "", "candidates": ["i1"]}', False),
    (b'{"user": 5, "candidates": ["i1"]}', False),
    (b'{"user": "u1"}', False),
    (b'{"user": "u1", "candidates": ["i1"], "extra": 1}', False),
    (b'{"user": "u1", "candidates": "i1"}', False),
    (b'["u1", ["i1"]]', False),
    (b'{"user": "u1", "candidates": [NaN]}', False),
    (b'{"user": "u1", "candidates": [123456789012345678901234567890]}', False),
    (b'{"user": "u1", "candidates": ["\\ud800"]}', False),  # a lone surrogate: json takes it, orjson not
    (b'{"user": "u1", "candidates": ["i1"]', False),
    (b"\xff\xfe{", False),
    (b"", False),
]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_the_score_route_answers_as_the_fastapi_route_does(service, content_type):
    """ScoreRoute answers well-formed bodies itself and hands every other one to FastAPI; both
    give the same status, the same JSON and the same scores."""
    from r2led.serve.guards import Guards

    limits = Limits(max_candidates=3, max_key_length=64)
    service.set_history("u1", ["i2", "i6", "i10"], [5, 4, 5])
    guarded = create_app(service, limits)
    route = guarded.app
    fastapi_app, passed_on = route.app, []

    async def counting(scope, receive, send):
        passed_on.append(scope["type"] == "http")
        await fastapi_app(scope, receive, send)

    route.app = counting
    headers = {"content-type": content_type}
    statuses = set()
    with TestClient(guarded) as fast, TestClient(Guards(fastapi_app, None, limits.max_body_bytes)) as direct:
        for body, handled in SCORE_BODIES:
            passed_on.clear()
            a = fast.post("/score", content=body, headers=headers)
            assert passed_on == ([] if handled and content_type == "application/json" else [True]), body
            b = direct.post("/score", content=body, headers=headers)
            got, expected = a.json(), b.json()
            got.pop("latency_ms", None), expected.pop("latency_ms", None)
            assert (a.status_code, got) == (b.status_code, expected), body
            assert a.headers["content-type"] == b.headers["content-type"] == "application/json", body
            assert ("server-timing" in a.headers) == ("server-timing" in b.headers) == (a.status_code == 200)
            statuses.add(a.status_code)
    # every class of answer was compared: scores, unknown keys, bad values, a body that is not JSON
    # (another content type is not read as JSON: 422)
    assert statuses == ({200, 400, 404, 422} if content_type == "application/json" else {422})


def test_the_score_route_reads_only_the_first_content_type(service):
    # Starlette reads the first content-type header: a text/plain body with a second, JSON
    # content-type goes to FastAPI (which answers 422), never to the fast path
    import asyncio

    from r2led.serve.score_route import ScoreRoute

    passed_on = []

    async def fastapi_app(scope, receive, send):
        passed_on.append(scope["path"])

    route = ScoreRoute(fastapi_app, service, Limits())
    body, sent = b'{"user": "u1", "candidates": ["i1"]}', []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    for first, second in ((b"text/plain", b"application/json"), (b"application/json", b"text/plain")):
        headers = [(b"content-type", first), (b"content-type", second)]
        scope = {"type": "http", "method": "POST", "path": "/score", "headers": headers}
        passed_on.clear()
        sent.clear()
        asyncio.run(route(scope, receive, send))
        assert passed_on == (["/score"] if first == b"text/plain" else [])
        assert bool(sent) == (first == b"application/json")  # the fast path answered itself


def test_an_unexpected_long_field_name_is_not_echoed_back(client):
    key = "k" * 5000  # pydantic puts an unexpected field's name into the error location
    r = client.put("/users/u1/history", json={"events": [], key: 1})
    assert r.status_code == 422
    assert key[:41] not in r.text and len(r.text) < 400


def test_an_error_body_quotes_at_most_100_characters_of_the_request_in_all(client):
    # three problems, each with a long field name and a long value: the quotes share 100 characters
    body = {"user": "U" * 5000, "candidates": ["C" * 5000], "Z" * 5000: "W" * 5000}
    for method, path in (("post", "/score"), ("put", "/users/u1/history")):
        r = getattr(client, method)(path, json=body)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        quoted = sum(len(run) for run in re.findall(r"U+|C{2,}|Z+|W+", detail))
        assert 0 < quoted <= 100, detail


def test_chunked_body_past_the_cap_is_413(client):
    def chunks():
        for _ in range(30):
            yield b" " * 10_000

    r = client.post("/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_keys_cover_everything_but_health(service, tmp_path):
    from r2led.serve.limits import read_api_keys

    (tmp_path / "keys").write_text(f"# service keys\n{KEY}\n{'z' * 24}\n\n")
    keys = read_api_keys(tmp_path / "keys")
    assert keys == {KEY, "z" * 24}
    with TestClient(create_app(service, api_keys=keys)) as c:
        assert c.get("/health").status_code == 200
        for path in ("/docs", "/openapi.json", "/users/u1/history"):
            r = c.get(path)
            assert r.status_code == 401 and "API key" in r.json()["detail"], path
            assert c.get(path, headers={"X-API-Key": "wrong" * 4}).status_code == 401
        assert c.get("/docs", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/users/u1/history", headers={"Authorization": f"Bearer {'z' * 24}"}).status_code == 200
        r = c.post("/score", json={"user": "u1", "candidates": ["i1"]})
        assert r.status_code == 401
        schema = c.get("/openapi.json", headers={"X-API-Key": KEY}).json()
        assert (
            schema["paths"]["/score"]["post"]["security"] == [{"ApiKey": []}]
            and "security" not in schema["paths"]["/health"]["get"]
        )
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(Exception, match="at least 16"):
        read_api_keys(tmp_path / "short")


def test_schema_states_the_limits_and_the_error_model(client, model):
    schema = client.get("/openapi.json").json()
    comp = schema["components"]["schemas"]
    score = schema["paths"]["/score"]["post"]
    assert set(score["responses"]) == {"200", "400", "404", "413", "422"}  # no keys: no 401
    assert score["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert comp["ErrorBody"]["properties"]["detail"]["type"] == "string"
    body = comp["ScoreBody"]["properties"]["candidates"]
    assert body["minItems"] == 1 and body["maxItems"] == 1000
    signal = comp["Event"]["properties"]["signal"]
    assert signal["minimum"] == 1 and signal["maximum"] == model.signal_max and signal["type"] == "integer"
    assert (
        set(comp["Features"]["properties"]) == set(model.feature_names)
        and comp["Features"]["additionalProperties"] is False
    )
    links = schema["paths"]["/users/{user}/history"]["put"]["responses"]["200"]["links"]
    assert links["ScoreThisUser"] == {
        "operationId": "score",
        "requestBody": {"user": "$request.path.user"},
        "description": "score candidates for this user",
    }


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_export_and_serve(run, tiny_store, tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "exported"
    res = runner.invoke(cli_app, ["export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "exported r2led" in res.output and (out / "manifest.json").is_file()
    res = runner.invoke(cli_app, ["export", str(run), "--out", str(out)])
    assert res.exit_code == 2 and "already holds an exported model" in res.output
    assert runner.invoke(cli_app, ["export", str(run), "--out", str(out), "--force"]).exit_code == 0

    from r2led.serve import server

    served = {}
    monkeypatch.setattr(
        server, "run", lambda cfg, host, port, workers: served.update(cfg=cfg, host=host, port=port, workers=workers)
    )
    db = tmp_path / "h.db"
    res = runner.invoke(
        cli_app, ["serve", str(out), "--port", "8123", "--store", str(db), "--preload", str(tiny_store.root)]
    )
    assert res.exit_code == 0, res.output
    assert served["port"] == 8123 and served["host"] == "127.0.0.1" and served["workers"] == 1
    assert f"preloaded the histories of {tiny_store.n_users} users" in res.output
    with TestClient(server.build_app(served["cfg"])) as c:
        assert c.get("/health").json()["users_in_store"] == tiny_store.n_users
    assert runner.invoke(cli_app, ["serve", str(out), "--port", "99999"]).exit_code == 2


def test_serve_refuses_to_preload_other_data(exported, tiny_store, tmp_path):
    from r2led.serve import server

    data = tmp_path / "data"
    shutil.copytree(tiny_store.root, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["note"] = "prepared again"
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = server.ServeConfig(bundle=str(exported), store=str(tmp_path / "h.db"))
    with pytest.raises(DataError, match="is not what this model was trained on"):
        server.preload(cfg, data)


def test_types_follow_json_schema_strictly(client):
    client.put("/users/u1/history", json={"events": []})
    ok = client.post(
        "/users/u1/events", json={"events": [{"item": "i3", "signal": 2.0}]}
    )  # 2.0 is a JSON Schema integer
    assert ok.status_code == 200 and client.get("/users/u1/history").json()["events"] == [{"item": "i3", "signal": 2}]
    r = client.post("/score", json={"user": "u1", "candidates": [7]})  # an integer key is matched as "7"
    assert r.status_code == 404 and "'7'" in r.json()["detail"]
    for bad in (
        {"item": "i3", "signal": "3"},
        {"item": True, "signal": 3},
        {"item": "i3", "signal": True},
        {"item": None, "signal": 3},
    ):
        assert client.post("/users/u1/events", json={"events": [bad]}).status_code == 422, bad
    assert client.post("/score", json={"user": 5, "candidates": ["i1"]}).status_code == 422  # a user key is a string
    assert client.get("/users/u1/history").json()["length"] == 1
