"""The scoring service: a ``ScoringModel`` behind an HTTP API (FastAPI).

    GET  /health                  model name, item count, users with a history, limits
    PUT  /users/{user}/history    {"items": [...], "signals": [...], "features": {...}?}
    POST /users/{user}/events     {"item": key, "signal": s}   (appended as the most recent)
    POST /score                   {"user": u, "candidates": [keys]} -> {"scores": [...], "latency_ms"}

Errors come back as JSON ``{"detail": "..."}`` naming the bad value: an unknown item or user
is 404, any other unusable input (bad signal, empty or oversize candidate list, malformed
body) is 422. Endpoints are plain functions, so FastAPI runs them in its thread pool and one
slow request does not block the others; ``ScoringModel`` is thread-safe.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from r2led import __version__
from r2led.serve.export import ScoringInputError, ScoringModel, UnknownItemError, UnknownUserError

ItemKey = str | int  # JSON clients may send numeric keys (e.g. MovieLens ids); matched as strings


class HistoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemKey] = Field(description="item keys, oldest first")
    signals: list[int] = Field(description="behaviour signal per item (e.g. rating), 1..signal_max")
    features: dict[str, str | int] | None = Field(None, description="user feature values by name (others unchanged)")


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item: ItemKey
    signal: int


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str
    candidates: list[ItemKey] = Field(description="item keys to score; at most the service's max_candidates")


class ScoreResponse(BaseModel):
    user: str
    scores: list[float] = Field(description="click probability per candidate, in request order")
    history_length: int
    latency_ms: float = Field(description="time spent scoring, in the service")


def create_app(scoring: ScoringModel) -> FastAPI:
    """An app serving ``scoring``; it keeps histories in memory for as long as it runs."""
    app = FastAPI(title="r2led scoring", version=__version__)
    app.state.scoring = scoring

    @app.exception_handler(UnknownItemError)
    @app.exception_handler(UnknownUserError)
    async def _not_found(request: Request, exc: ScoringInputError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(ScoringInputError)
    async def _unusable(request: Request, exc: ScoringInputError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        # one readable line per problem, naming the field and the value received
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
            problems.append(f"{where}: {err['msg']}{got}")
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": scoring.name,
            "items": scoring.n_items,
            "users": scoring.users_with_history,
            "t_max": scoring.t_max,
            "max_candidates": scoring.max_candidates,
            "r2led": __version__,
        }

    @app.put("/users/{user}/history")
    def put_history(user: str, body: HistoryRequest) -> dict:
        return scoring.set_history(user, [str(k) for k in body.items], body.signals, body.features)

    @app.post("/users/{user}/events")
    def post_event(user: str, body: EventRequest) -> dict:
        return scoring.append(user, str(body.item), body.signal)

    @app.post("/score", response_model=ScoreResponse)
    def score(body: ScoreRequest) -> ScoreResponse:
        t0 = time.perf_counter()
        scores = scoring.score(body.user, [str(k) for k in body.candidates])
        latency = (time.perf_counter() - t0) * 1000
        return ScoreResponse(
            user=body.user, scores=scores.tolist(), history_length=scoring.history_length(body.user), latency_ms=round(latency, 3)
        )

    return app
