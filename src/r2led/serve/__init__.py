"""Serving: export a trained run to a self-contained folder and score candidates for users.

``export_run(run, out)`` writes the folder, ``load_exported(out)`` reads it back as a
``ScoringModel`` (no original store needed), and ``r2led.serve.service.create_app`` puts a
``ScoringModel`` behind an HTTP API (FastAPI).
"""

from r2led.serve.export import (
    ScoringInputError,
    ScoringModel,
    UnknownItemError,
    UnknownUserError,
    export_run,
    load_exported,
)

__all__ = [
    "ScoringInputError",
    "ScoringModel",
    "UnknownItemError",
    "UnknownUserError",
    "export_run",
    "load_exported",
]
