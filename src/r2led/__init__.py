"""r2led: lifelong user modeling for CTR prediction with semantic IDs.

The pipeline flows one way: sources -> LifelongStore -> SID table -> batches -> models ->
trainer / bench / serve. See docs/architecture.md.
"""

__version__ = "0.1.0"
