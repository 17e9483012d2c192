"""r2led: lifelong user modeling for CTR prediction with semantic IDs.

The pipeline flows one way: sources -> LifelongStore -> SID table -> batches -> models ->
trainer / bench / serve. See docs/architecture.md.
"""

import os as _os

__version__ = "0.1.0"

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise): with
# spinning threads, one busy core made training 14x slower. Read when torch loads, so it is
# set here, before any r2led module imports torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
