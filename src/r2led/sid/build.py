"""Build a SID table for a prepared store: encode items, quantize residually, report, save.

store.items --encoder--> (N, D) --quantizer--> codes (N, L) [--unique--> (N, L+1)]
      --> SidTable (codes, prefix tokens, settings, quality) --> DATA/<out>/
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from r2led.errors import ConfigError, DataError
from r2led.sid.encoders import ENCODERS, check_embeddings, encode_items
from r2led.sid.quality import collision_stats, sid_quality
from r2led.sid.quantizers import QUANTIZERS, append_unique_level, quantize
from r2led.sid.table import SidTable

DEFAULT_CODEBOOK = 16


def parse_codebook(value: int | str | Sequence[int] | None, levels: int) -> list[int]:
    """Codebook sizes per level from ``16`` (every level), ``"16,16,32"`` or a list.

    Raises ConfigError naming the value when it is not a positive-integer list, when its
    length differs from ``levels`` or when a size is below 2.
    """
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ConfigError(f"levels must be a positive integer, got {levels!r}")
    if value is None:
        sizes: list = [DEFAULT_CODEBOOK] * levels
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"codebook {value!r}: expected one size (16) or one per level (16,16,32)") from None
        if len(sizes) == 1:
            sizes = sizes * levels
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        sizes = [int(value)] * levels
    else:
        sizes = list(value)
        if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in sizes):
            raise ConfigError(f"codebook {value!r}: sizes must be integers")
        sizes = [int(k) for k in sizes]
    if len(sizes) != levels:
        raise ConfigError(f"codebook {value!r} gives {len(sizes)} sizes for levels={levels}; give one size or {levels}")
    if min(sizes) < 2:
        raise ConfigError(f"codebook {value!r}: every level needs at least 2 codes")
    return sizes


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """ConfigError naming the value when it is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def sid_table_from_embeddings(
    vectors: np.ndarray,
    quantizer: str = "rq-kmeans",
    codebook: int | str | Sequence[int] | None = None,
    levels: int = 3,
    seed: int = 0,
    unique: bool = False,
    settings: dict | None = None,
    progress: bool = False,
) -> SidTable:
    """Quantize item embeddings (N, D) of items 1..N into a SidTable with its quality report.

    ``settings`` are merged into the table's settings (the encoder's name, for instance).
    Validates the arguments first; raises DataError for NaN embeddings or a codebook larger
    than the item count.
    """
    check_choice("quantizer", quantizer, QUANTIZERS)
    sizes = parse_codebook(codebook, levels)
    vectors = check_embeddings(vectors)
    n = vectors.shape[0]
    if max(sizes) > n:
        raise DataError(f"codebook size {max(sizes)} exceeds the {n} items; choose sizes of at most {n}")

    t0 = time.perf_counter()
    result = quantize(vectors, quantizer, sizes, seed=seed, progress=progress)
    codes = result.codes  # (N, L)
    quantize_seconds = time.perf_counter() - t0
    all_sizes = list(sizes)
    semantic = collision_stats(codes)
    if unique:
        codes = append_unique_level(codes)  # (N, L+1)
        all_sizes.append(int(codes[:, -1].max()) + 1)

    quality = sid_quality(codes, all_sizes, vectors)
    for level, left in zip(quality["levels"], result.residual_variance, strict=False):
        level["residual_variance"] = left
    if unique:
        quality["semantic"] = semantic  # collisions of the L semantic levels, before numbering
    quality["reconstruction_error"] = result.reconstruction_error
    quality["quantize_seconds"] = round(quantize_seconds, 3)
    meta = {
        **(settings or {}),
        "quantizer": quantizer,
        "levels": levels,
        "codebook": sizes,
        "seed": seed,
        "unique": unique,
        "n_items": n,
        "embedding_dim": int(vectors.shape[1]),
        "quantizer_params": result.params,
    }
    return SidTable.from_codes(codes, meta, quality)


def build_sid_table(
    store,
    encoder: str = "minilm",
    quantizer: str = "rq-kmeans",
    levels: int = 3,
    codebook: int | str | Sequence[int] | None = None,
    seed: int = 0,
    unique: bool = False,
    out: str = "sid",
    progress: bool = False,
    cache: bool = True,
    force: bool = False,
) -> SidTable:
    """Build the SID table of a store and save it to ``DATA/<out>/``.

    store: a ``LifelongStore`` or its folder. codebook: codes per level (``16`` for every
    level, ``[16, 16, 32]`` or ``"16,16,32"``; default 16 each). ``unique`` appends a level
    that numbers items sharing a SID. MiniLM embeddings are cached in ``DATA/embeddings/``
    unless ``cache`` is False. Returns the saved table (codes (N+1, L[+1]), padding row 0).

    An existing ``DATA/<out>`` is refused (ConfigError, before any encoding) unless ``force``:
    runs record the fingerprint of the table they were trained on and refuse a rebuilt one.
    With ``force`` the old table stays in place until the new one is complete. Anything else
    at ``DATA/<out>`` (a store file, the embedding cache) is refused even with ``force``.
    """
    from r2led.data.store import LifelongStore

    t0 = time.perf_counter()
    if not isinstance(store, LifelongStore):
        store = LifelongStore(store)
    check_choice("encoder", encoder, ENCODERS)
    check_choice("quantizer", quantizer, QUANTIZERS)
    sizes = parse_codebook(codebook, levels)
    if max(sizes) > store.n_items:
        raise DataError(
            f"codebook size {max(sizes)} exceeds the {store.n_items} items of {store.root}; "
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

    emb = encode_items(store, encoder, seed=seed, cache=cache)  # (N, D)
    table = sid_table_from_embeddings(
        emb.vectors, quantizer, sizes, levels, seed, unique, settings={"encoder": encoder}, progress=progress
    )
    table.quality["encode_seconds"] = round(emb.seconds, 3)
    table.quality["embedding_cache_hit"] = emb.cache_hit
    table.quality["build_seconds"] = round(time.perf_counter() - t0, 3)
    table.save(target)
    return table
