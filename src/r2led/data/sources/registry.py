"""Name -> source loader. Each loader returns validated ``CanonicalTables``."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from r2led.data.tables import CanonicalTables
from r2led.errors import DataError

# name -> (module, function); imported lazily so that one broken source never breaks the rest.
SOURCES: dict[str, tuple[str, str]] = {
    "ml-1m": ("r2led.data.sources.movielens", "load_ml1m"),
    "ml-100k": ("r2led.data.sources.movielens", "load_ml100k"),
    "synthetic": ("r2led.data.sources.synthetic", "load_synthetic"),
    "synthetic-lifelong": ("r2led.data.sources.lifelong", "load_lifelong"),
    "taobao": ("r2led.data.sources.taobao", "load_taobao"),
    "amazon": ("r2led.data.sources.amazon", "load_amazon"),
    "kuairand": ("r2led.data.sources.kuairand", "load_kuairand"),
}


def get_loader(name: str) -> Callable[..., CanonicalTables]:
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    module, func = SOURCES[name]
    return getattr(import_module(module), func)


def load_source(name: str, **options) -> CanonicalTables:
    return get_loader(name)(**options)
