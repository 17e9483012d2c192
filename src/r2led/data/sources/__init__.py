"""Sources: one module per raw format, each returning ``CanonicalTables``."""

from r2led.data.sources.registry import SOURCES, load_source

__all__ = ["SOURCES", "load_source"]
