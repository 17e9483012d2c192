"""Serving: export a trained run as a bundle, and score candidates for users over HTTP.

- ``export_run(run, out)`` writes a bundle (``r2led.serve.bundle``); ``load_bundle(out)`` reads
  it back as a ``ScoringModel``, checking every file's sha256 (``r2led.serve.bundle_load``).
- ``ScoringModel`` (``r2led.serve.scoring``): vocabularies and the one call to the model.
- ``HistoryStore`` (``r2led.serve.history_store``): durable user histories, SQLite (WAL) or
  Redis; ``UserHistories`` (``r2led.serve.user_cache``): the LRU of users in memory.
- ``ScoringService`` (``r2led.serve.scoring_service``): what the routes call;
  ``create_app`` (``r2led.serve.service``) the FastAPI app, behind ``ScoreRoute``
  (``r2led.serve.score_route``, the short path of ``POST /score``) and the guards;
  ``r2led.serve.server`` runs it.
"""

from r2led.serve.bundle import export_run
from r2led.serve.bundle_load import load_bundle
from r2led.serve.errors import BundleError, HistoryStoreError, ScoringInputError, UnknownItemError, UnknownUserError
from r2led.serve.history_store import HistoryStore
from r2led.serve.scoring import ScoringModel
from r2led.serve.scoring_service import ScoringService
from r2led.serve.stores import open_store

__all__ = [
    "BundleError",
    "HistoryStore",
    "HistoryStoreError",
    "ScoringInputError",
    "ScoringModel",
    "ScoringService",
    "UnknownItemError",
    "UnknownUserError",
    "export_run",
    "load_bundle",
    "open_store",
]
