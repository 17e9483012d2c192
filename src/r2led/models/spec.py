"""DataSpec: what a model needs to know about a dataset (sizes and per-item feature tables)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r2led.data.store import LifelongStore


@dataclass
class DataSpec:
    n_items: int  # real items are 1..n_items; 0 is padding
    user_feature_sizes: list[int]  # cardinality (incl. 0 = unknown) per user feature
    signal_size: int  # behaviour signal values 0..signal_size-1 (0 = padding)
    item_category: np.ndarray  # (N+1,) int64
    n_categories: int
    item_tags: np.ndarray  # (N+1, G) int64, 0-padded
    n_tags: int

    @classmethod
    def from_store(cls, store: LifelongStore) -> DataSpec:
        m = store.manifest
        return cls(
            n_items=store.n_items,
            user_feature_sizes=list(m["user_features"].values()),
            signal_size=int(m["signal_max"]) + 1,
            item_category=store.item_category,
            n_categories=int(m["categories"]),
            item_tags=store.item_tags,
            n_tags=int(m["tags"]),
        )

    def to_dict(self) -> dict:
        return {
            "n_items": self.n_items,
            "user_feature_sizes": self.user_feature_sizes,
            "signal_size": self.signal_size,
            "item_category": self.item_category.tolist(),
            "n_categories": self.n_categories,
            "item_tags": self.item_tags.tolist(),
            "n_tags": self.n_tags,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        return cls(
            n_items=int(d["n_items"]),
            user_feature_sizes=list(d["user_feature_sizes"]),
            signal_size=int(d["signal_size"]),
            item_category=np.asarray(d["item_category"], dtype=np.int64),
            n_categories=int(d["n_categories"]),
            item_tags=np.asarray(d["item_tags"], dtype=np.int64).reshape(len(d["item_category"]), -1),
            n_tags=int(d["n_tags"]),
        )
