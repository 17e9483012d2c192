"""Build a SID table for a prepared store: encode items, quantize residually, report, save.

store.items --encoder--> (N, D) --quantizer--> codes (N, L) [--unique--> (N, L+1)]
      --> SidTable (codes, prefix tokens, settings, quality) --> DATA/<out>/
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from r2led.config import SidConfig, load_sid_config
from r2led.errors import ConfigError, DataError
from r2led.sid.encoders import check_embeddings, encode_items
from r2led.sid.quality import collision_stats, sid_quality
from r2led.sid.quantizers import Quantization, append_unique_level, rq_kmeans
from r2led.sid.table import SidTable


def sid_config(config: SidConfig | None = None, **settings: Any) -> SidConfig:
    """``config`` with ``settings`` (SidConfig fields: ``encoder="tfidf"``, ``codebook="16,16,32"``)
    applied, validated by ``SidConfig``; a bad value raises one ConfigError line naming it."""
    if config is not None and not settings:
        return config
    base = config.model_dump() if config is not None else {}
    return load_sid_config(base={**base, **settings})


def quantize(x: np.ndarray, config: SidConfig, progress: bool = False) -> Quantization:
    """Codes (N, L) for embeddings x (N, D) with ``config.quantizer`` (``r2led.config.Quantizer``)."""
    if config.quantizer in ("rq-kmeans", "rq-kmeans-balanced"):
        return rq_kmeans(x, config.codebook, seed=config.seed, balanced=config.quantizer == "rq-kmeans-balanced")
    from r2led.sid.rq_vae import RqVaeConfig, train_rq_vae

    sinkhorn = config.quantizer == "rq-vae-sinkhorn"
    return train_rq_vae(x, config.codebook, RqVaeConfig(seed=config.seed, sinkhorn=sinkhorn), progress=progress)


def sid_table_from_embeddings(vectors: np.ndarray, config: SidConfig, progress: bool = False) -> SidTable:
    """Quantize item embeddings (N, D) of items 1..N into a SidTable with its quality report.

    Raises DataError for NaN embeddings or a codebook larger than the item count.
    """
    sizes = config.codebook
    vectors = check_embeddings(vectors)
    n = vectors.shape[0]
    if max(sizes) > n:
        raise DataError(f"codebook size {max(sizes)} exceeds the {n} items; choose sizes of at most {n}")

    t0 = time.perf_counter()
    result = quantize(vectors, config, progress=progress)
    codes = result.codes  # (N, L)
    quantize_seconds = time.perf_counter() - t0
    all_sizes = list(sizes)
    semantic = collision_stats(codes)
    if config.unique:
        codes = append_unique_level(codes)  # (N, L+1)
        all_sizes.append(int(codes[:, -1].max()) + 1)

    quality = sid_quality(codes, all_sizes, vectors)
    for level, left in zip(quality["levels"], result.residual_variance, strict=False):
        level["residual_variance"] = left
    if config.unique:
        quality["semantic"] = semantic  # collisions of the L semantic levels, before numbering
    quality["reconstruction_error"] = result.reconstruction_error
    quality["quantize_seconds"] = round(quantize_seconds, 3)
    meta = {
        **config.model_dump(),
        "n_items": n,
        "embedding_dim": int(vectors.shape[1]),
        "quantizer_params": result.params,
    }
    return SidTable.from_codes(codes, meta, quality)


def build_sid_table(
    store,
    config: SidConfig | None = None,
    *,
    out: str = "sid",
    progress: bool = False,
    cache: bool = True,
    force: bool = False,
    **settings: Any,
) -> SidTable:
    """Build the SID table of a store and save it to ``DATA/<out>/``.

    store: a ``LifelongStore`` or its folder. ``config`` (default ``SidConfig()``) with
    ``settings`` applied (``encoder="tfidf"``, ``codebook="16,16,32"``, see ``SidConfig``).
    MiniLM embeddings are cached in ``DATA/embeddings/`` unless ``cache`` is False. Returns the
    saved table (codes (N+1, L[+1]), padding row 0).

    An existing ``DATA/<out>`` is refused (ConfigError, before any encoding) unless ``force``:
    runs record the fingerprint of the table they were trained on and refuse a rebuilt one.
    With ``force`` the old table stays in place until the new one is complete. Anything else
    at ``DATA/<out>`` (a store file, the embedding cache) is refused even with ``force``.
    """
    from r2led.data.store import LifelongStore

    t0 = time.perf_counter()
    config = sid_config(config, **settings)
    if not isinstance(store, LifelongStore):
        store = LifelongStore(store)
    if max(config.codebook) > store.n_items:
        raise DataError(
            f"codebook size {max(config.codebook)} exceeds the {store.n_items} items of {store.root}; "
            f"choose sizes of at most {store.n_items}"
        )
    if not out or Path(out).name != out or out.startswith("."):
        raise ConfigError(f"out {out!r} must be a plain folder name inside {store.root}")
    target = store.root / out
    if os.path.lexists(target) and not (target / "meta.json").is_file():
        raise ConfigError(f"{target} exists and is not a SID table; choose another --out (or remove it)")
    if target.exists() and not force:
        raise ConfigError(
            f"SID table {target} already exists; pass --force to rebuild it (runs trained on it would be "
            f"invalidated: evaluate, --resume, export and serve refuse them) or --out NAME for another table"
        )

    emb = encode_items(store, config.encoder, seed=config.seed, cache=cache)  # (N, D)
    table = sid_table_from_embeddings(emb.vectors, config, progress=progress)
    table.quality["encode_seconds"] = round(emb.seconds, 3)
    table.quality["embedding_cache_hit"] = emb.cache_hit
    table.quality["build_seconds"] = round(time.perf_counter() - t0, 3)
    table.save(target)
    return table
