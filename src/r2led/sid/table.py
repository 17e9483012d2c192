"""SidTable: item -> hierarchical codes and per-level prefix tokens, saved beside a store.

On disk (``DATA/sid/`` by default)::

    codes.npy          (N+1, L) int64  c_l(v) < K_l; row 0 (padding item) is all -1
    prefix_tokens.npy  (N+1, L) int64  p_l(v): id of the prefix (c_1..c_l) in level l's
                                       vocabulary, 1..V_l; 0 for the padding item
    meta.json          settings (encoder, quantizer, levels, codebook sizes, seed, ...) and
                       vocab_sizes (V_l + 1 per level, counting the 0 token)
    quality.json       the quality report (see r2led.sid.quality)

A level-2 code means something only under its level-1 parent, so models embed prefix tokens,
not raw codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from r2led.atomic import staged_folder
from r2led.errors import DataError


def prefix_tokens(codes: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Per-level prefix ids for codes (n, L): token 1..V_l, prefixes in sorted order.

    Returns (tokens (n, L) int64 with values 1..V_l, vocab sizes V_l + 1 per level).
    """
    n, levels = codes.shape
    tokens = np.zeros((n, levels), dtype=np.int64)
    sizes = []
    for level in range(levels):
        _, inverse = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
        tokens[:, level] = inverse.reshape(-1) + 1
        sizes.append(int(tokens[:, level].max(initial=0)) + 1)
    return tokens, sizes


@dataclass
class SidTable:
    codes: np.ndarray  # (N+1, L) int64, row 0 = padding (-1)
    prefix_tokens: np.ndarray  # (N+1, L) int64, row 0 = 0
    vocab_sizes: list[int]  # per level: V_l + 1
    settings: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)

    @classmethod
    def from_codes(cls, item_codes: np.ndarray, settings: dict | None = None, quality: dict | None = None) -> SidTable:
        """Build from codes of items 1..N (shape (N, L)); adds the padding row 0."""
        item_codes = np.asarray(item_codes, dtype=np.int64)
        tokens, sizes = prefix_tokens(item_codes)
        pad_codes = np.full((1, item_codes.shape[1]), -1, dtype=np.int64)
        pad_tokens = np.zeros((1, item_codes.shape[1]), dtype=np.int64)
        return cls(
            codes=np.vstack([pad_codes, item_codes]),
            prefix_tokens=np.vstack([pad_tokens, tokens]),
            vocab_sizes=sizes,
            settings=dict(settings or {}),
            quality=dict(quality or {}),
        )

    @property
    def levels(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0] - 1)

    def save(self, path: str | Path) -> Path:
        """Write the four files to ``path`` atomically (``r2led.atomic.staged_folder``).

        A failure part-way (ENOSPC, an interrupt) leaves a previous table at ``path`` as it was.
        """
        path = Path(path)
        with staged_folder(path) as tmp:
            np.save(tmp / "codes.npy", self.codes)
            np.save(tmp / "prefix_tokens.npy", self.prefix_tokens)
            (tmp / "quality.json").write_text(json.dumps(self.quality, indent=2))
            (tmp / "meta.json").write_text(
                json.dumps({"settings": self.settings, "vocab_sizes": self.vocab_sizes}, indent=2)
            )
        return path

    @classmethod
    def load(cls, path: str | Path, n_items: int | None = None) -> SidTable:
        """Read a saved table; a missing, unreadable or inconsistent file -> one-line DataError.

        ``n_items``: the store's catalogue size, which the table must cover exactly.
        """
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"no SID table at {path}; build one with `r2led sid build {path.parent}`")
        quality_path = path / "quality.json"
        try:
            meta = json.loads(meta_path.read_text())
            quality = json.loads(quality_path.read_text()) if quality_path.is_file() else {}
            codes = np.load(path / "codes.npy")
            tokens = np.load(path / "prefix_tokens.npy")
        except (OSError, ValueError) as exc:  # JSON, UTF-8, truncated or pickled arrays
            raise DataError(f"SID table at {path} is corrupt: {exc}") from exc
        problem = None
        if not isinstance(meta, dict) or not isinstance(quality, dict):
            problem = "meta.json and quality.json must hold JSON objects"
        elif codes.ndim != 2 or codes.shape != tokens.shape or codes.dtype.kind != "i" or tokens.dtype.kind != "i":
            problem = f"codes {codes.shape} {codes.dtype} vs prefix tokens {tokens.shape} {tokens.dtype}"
        elif not isinstance(meta.get("vocab_sizes"), list) or len(meta["vocab_sizes"]) != codes.shape[1]:
            problem = f"meta.json needs vocab_sizes for each of the {codes.shape[1]} levels"
        elif not all(isinstance(v, int) for v in meta["vocab_sizes"]) or bool(
            (tokens.min(axis=0, initial=0) < 0).any()
            or (tokens.max(axis=0, initial=0) >= np.asarray(meta["vocab_sizes"])).any()
        ):
            problem = "prefix tokens outside the vocabulary sizes in meta.json"
        if problem is not None:
            raise DataError(f"SID table at {path} is corrupt: {problem}")
        if n_items is not None and codes.shape[0] != n_items + 1:
            raise DataError(
                f"SID table at {path} covers {codes.shape[0] - 1} items but the store has {n_items}; "
                f"rebuild it with `r2led sid build {path.parent} --force`"
            )
        return cls(codes, tokens, list(meta["vocab_sizes"]), meta.get("settings", {}), quality)
