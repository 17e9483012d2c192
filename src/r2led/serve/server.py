"""Running the service: ``ServeConfig`` -> bundle, store, service, app, uvicorn workers.

``r2led serve BUNDLE`` builds a ``ServeConfig`` and calls ``run``. With ``--workers N > 1``
uvicorn starts N worker processes; each loads the bundle and opens the store itself (from the
config, passed in the ``R2LED_SERVE`` environment variable to ``app_from_env``), so all of them
share the store's users. Preloading histories from a data folder happens once, before the
workers start.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from r2led.serve.limits import Limits, read_api_keys

ENV = "R2LED_SERVE"


class ServeConfig(BaseModel):
    """Everything ``r2led serve`` was given."""

    model_config = ConfigDict(extra="forbid")

    bundle: str
    store: str = Field(description="SQLite file path, or redis://host:port/db")
    api_key_file: str | None = None
    max_users_in_memory: int = 100_000
    threads: int = 1
    limits: dict[str, int] = Field(default_factory=dict)


def build_app(cfg: ServeConfig):
    """Load the bundle (hash-checked), open the store and return the ASGI app."""
    import torch

    from r2led.serve.bundle_load import load_bundle
    from r2led.serve.scoring_service import ScoringService
    from r2led.serve.service import create_app
    from r2led.serve.stores import open_store

    torch.set_num_threads(cfg.threads)
    limits = Limits(**cfg.limits)
    keys = read_api_keys(cfg.api_key_file) if cfg.api_key_file else None
    scoring = load_bundle(cfg.bundle)
    store = open_store(cfg.store, scoring.t_max)
    if getattr(store, "durable", True) is False:
        logging.getLogger("r2led.serve").warning(
            "the Redis server at %s does not fsync every write (appendonly yes, appendfsync always): "
            "an acknowledged append can be lost if Redis itself crashes",
            cfg.store,
        )
    service = ScoringService(
        scoring, store, max_candidates=limits.max_candidates, max_users_in_memory=cfg.max_users_in_memory
    )
    app = create_app(service, limits, keys)
    gc.collect()
    gc.freeze()  # what loading made lives as long as the process: keep it out of every later collection
    return app


def app_from_env():
    """The app of one uvicorn worker, from the config in ``R2LED_SERVE`` (JSON)."""
    return build_app(ServeConfig(**json.loads(os.environ[ENV])))


def preload(cfg: ServeConfig, data: str | Path) -> int:
    """Write every user's recent history from a prepared data folder into the store, after
    checking that the folder is the data the bundle's run was trained on."""
    from r2led.data.store import LifelongStore
    from r2led.serve.bundle_load import check_data_fingerprint, load_bundle, read_manifest
    from r2led.serve.scoring_service import ScoringService
    from r2led.serve.stores import open_store

    check_data_fingerprint(read_manifest(cfg.bundle), data)
    scoring = load_bundle(cfg.bundle)
    store = open_store(cfg.store, scoring.t_max)
    try:
        return ScoringService(scoring, store).preload(LifelongStore(data))
    finally:
        store.close()


def run(cfg: ServeConfig, host: str, port: int, workers: int) -> None:
    """Serve until interrupted: in this process for one worker, else ``workers`` processes."""
    import uvicorn

    if workers == 1:
        uvicorn.run(build_app(cfg), host=host, port=port, log_level="warning", access_log=False)
    else:
        # check what the workers will open, so a bad bundle or store is one line here, not N tracebacks
        from r2led.serve.bundle_load import read_manifest, verify_files
        from r2led.serve.stores import open_store

        manifest = read_manifest(cfg.bundle)
        verify_files(Path(cfg.bundle), manifest)
        open_store(cfg.store, int(manifest["t_max"])).close()
        os.environ[ENV] = cfg.model_dump_json()
        uvicorn.run(
            "r2led.serve.server:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            access_log=False,  # a log line per request costs CPU; errors are still logged
        )
