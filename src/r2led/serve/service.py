"""The scoring service: a ``ScoringService`` behind an HTTP API (FastAPI), orjson responses.

    GET  /health                  model, item count, users in the store and in memory, limits (no key)
    GET  /users/{user}/history    {"user", "length", "events": [{"item", "signal"}, ...]}
    PUT  /users/{user}/history    {"events": [{"item": key, "signal": s}, ...], "features": {...}?}
    POST /users/{user}/events     {"events": [...]}   appended as the most recent, atomically
    POST /score                   {"user": u, "candidates": [keys]} -> {"scores": [...], ...}

The OpenAPI schema states what is enforced: strict JSON types (``true`` is not an item, ``"3"``
is not a signal), key lengths, counts (``minItems``/``maxItems``), the signal range and the
feature names, and every error each route can answer, always ``{"detail": "<one line>"}``:
400 a body that is not JSON, 401 no or unknown API key, 404 an unknown user or item,
413 a body past the cap, 422 anything else unusable. Error bodies quote at most 40 characters
of a value that was sent. Links (PUT history -> score, events, get history) let a client, or a
stateful test, follow a user from its history to its scores.

``/score`` answers with a ``Server-Timing`` header, ``model;dur=<ms>, model-cpu;dur=<ms>``: the
model's wall and CPU time for the request (the load test splits the server's CPU with it).
A well-formed ``/score`` is answered by ``ScoreRoute`` (``r2led.serve.score_route``) without
the FastAPI layers, exactly as its route would; everything else goes through FastAPI.
Other routes are plain functions: FastAPI runs them in its thread pool; the service is
thread-safe.
"""

import time
from typing import Annotated

import orjson
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from r2led import __version__
from r2led.serve.errors import ECHO_CHARS, ECHO_TOTAL, ScoringInputError, UnknownItemError, UnknownUserError, clip
from r2led.serve.guards import OPEN_PATHS, Guards
from r2led.serve.limits import Limits
from r2led.serve.score_route import ScoreRoute, score_answer
from r2led.serve.scoring_service import ScoringService


class OrjsonResponse(JSONResponse):
    """JSON rendered by orjson (several times faster than the standard library's encoder)."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ErrorBody(BaseModel):
    """Every error answer: one line saying what is wrong."""

    detail: str = Field(description="what is wrong, quoting at most 40 characters of any value sent")


ERRORS = {
    400: "the body is not valid JSON (or not UTF-8)",
    401: "no API key, or one the service does not know (X-API-Key header)",
    404: "an unknown user or item key",
    413: "the request body is larger than the service's cap",
    422: "a value of the wrong type, out of range, too long, or too many of them",
}


def _errors(keyed: bool, *codes: int) -> dict:
    """The error responses of a route (401 only where keys are required)."""
    return {code: {"model": ErrorBody, "description": ERRORS[code]} for code in codes if code != 401 or keyed}


def _json_integer(value):
    """JSON Schema's integer: a number with no fractional part (``3`` or ``3.0``), never a
    string (``"3"``) nor a boolean (``true``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("Input should be a valid integer")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


def _models(service: ScoringService, limits: Limits):
    """Request and response models, with the limits and vocabularies of this service."""
    scoring = service.scoring
    key_len = limits.max_key_length
    ItemKey = Annotated[StrictStr, Field(min_length=1, max_length=key_len)] | JsonInt
    UserKey = Annotated[StrictStr, Field(min_length=1, max_length=key_len)]
    Signal = Annotated[
        int,
        Field(ge=1, le=scoring.signal_max, description=f"behaviour signal (e.g. a rating), 1..{scoring.signal_max}"),
        BeforeValidator(_json_integer),
    ]
    FeatureValue = Annotated[StrictStr, Field(max_length=key_len)] | JsonInt

    class Event(BaseModel):
        model_config = ConfigDict(extra="forbid")
        item: ItemKey = Field(description="item key (a string, or an integer matched as its decimal string)")
        signal: Signal

    features = {
        name: (
            FeatureValue,
            Field(None, description=f"known values: {', '.join(vals[:10])}{' ...' if len(vals) > 10 else ''}"),
        )
        for name, vals in scoring.feature_values.items()
    }
    Features = create_model("Features", __config__=ConfigDict(extra="forbid"), **features)

    # examples from this model's own vocabularies, so a reader (or a test generator) sees real keys
    items = scoring.item_keys[:3]
    example_events = [{"item": k, "signal": min(i + 1, scoring.signal_max)} for i, k in enumerate(items)]
    example_user = (scoring.table_users or ["new-user"])[0]

    class HistoryBody(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"events": example_events}]})
        events: list[Event] = Field(
            max_length=service.t_max, description=f"the whole history, oldest first, at most t_max = {service.t_max}"
        )
        features: Features = Field(
            None,
            description="user feature values by name (others unchanged); "
            "a value outside the vocabulary is scored as unknown",
        )

    class EventsBody(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"events": example_events[:1]}]})
        events: list[Event] = Field(
            min_length=1, max_length=limits.max_events, description="events to append, oldest first"
        )

    class ScoreBody(BaseModel):
        model_config = ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"user": example_user, "candidates": items}]}
        )
        user: UserKey
        candidates: list[ItemKey] = Field(
            min_length=1, max_length=limits.max_candidates, description="item keys to score"
        )

    return Event, HistoryBody, EventsBody, ScoreBody, UserKey


class StoredEvent(BaseModel):
    item: str
    signal: int


class HistoryView(BaseModel):
    user: str
    length: int
    events: list[StoredEvent] = Field(description="oldest first")


class HistorySet(BaseModel):
    user: str
    length: int = Field(description="behaviours kept (the most recent t_max)")
    dropped: int = Field(description="oldest behaviours beyond t_max that were not kept")
    unknown_features: dict[str, str] = Field(
        None, description="feature values outside the vocabulary (scored as unknown); absent when none"
    )


class Appended(BaseModel):
    user: str
    length: int = Field(description="the user's history length after the append (at most t_max)")


class Scores(BaseModel):
    user: str
    scores: list[float] = Field(description="click probability per candidate, in request order")
    history_length: int
    latency_ms: float = Field(description="time spent scoring in the service")


class Health(BaseModel):
    status: str
    model: str
    items: int
    t_max: int
    store: str
    users_in_store: int = Field(description="users with a record in the store (counted at most every 5 s)")
    users_in_memory: int = Field(description="users held in this worker's memory")
    limits: dict[str, int]
    r2led: str


def create_app(service: ScoringService, limits: Limits | None = None, api_keys: frozenset[str] | None = None) -> Guards:
    """The HTTP app for ``service``: an ASGI app, ``Guards`` (keys, body cap) in front of
    ``ScoreRoute`` (well-formed ``POST /score``, as ``.app``) in front of the FastAPI app (``.app.app``);
    with ``api_keys`` every path but /health needs one."""
    limits = limits or Limits(max_candidates=service.max_candidates)
    keyed = bool(api_keys)
    Event, HistoryBody, EventsBody, ScoreBody, UserKey = _models(service, limits)
    UserPath = Annotated[str, Path(min_length=1, max_length=limits.max_key_length, description="user key")]
    app = FastAPI(title="r2led scoring", version=__version__, default_response_class=OrjsonResponse)
    app.state.service = service

    @app.exception_handler(UnknownItemError)
    @app.exception_handler(UnknownUserError)
    async def _not_found(request: Request, exc: ScoringInputError) -> Response:
        return OrjsonResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ScoringInputError)
    async def _unusable(request: Request, exc: ScoringInputError) -> Response:
        return OrjsonResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 for a body it cannot decode; routing answers 404/405 itself
        detail = "the body is not valid JSON (UTF-8)" if exc.status_code == 400 else str(exc.detail)[:100]
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not just the first route's
            headers["allow"] = ", ".join(sorted(_allowed_methods(app, request.scope)))
        return OrjsonResponse({"detail": detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return OrjsonResponse({"detail": "the body is not valid JSON (UTF-8)"}, status_code=400)
        groups: dict[str, list] = {}  # a union (item key: string or integer) reports once per branch
        for err in errors:
            groups.setdefault(_where(err["loc"], ECHO_CHARS), []).append(err)
        problems = []
        shown = list(groups.items())[:3]  # one short line: the first problems
        # every quote of the client's data (field names and values) shares ECHO_TOTAL characters
        quote = min(ECHO_CHARS, ECHO_TOTAL // (2 * max(len(shown), 1)))
        for _, errs in shown:
            where = _where(errs[0]["loc"], quote)
            err = next((e for e in errs if not e["type"].endswith("_type") and e["type"] != "value_error"), None)
            if err is None:  # only type errors: one per branch of the union, or a single one
                err = errs[0]
                msg = (
                    err["msg"].removeprefix("Value error, ")
                    if len(errs) == 1
                    else "Input should be a string or an integer"
                )
            else:
                msg = err["msg"]
            got = (
                f" (got {clip(err['input'], quote)})"
                if "input" in err and not isinstance(err["input"], (dict, list))
                else ""
            )
            problems.append(f"{where}: {msg}{got}")
        more = f"; and {len(groups) - 3} more" if len(groups) > 3 else ""
        return OrjsonResponse({"detail": "; ".join(problems) + more}, status_code=422)

    counted = [0.0, 0]  # (when, count): counting a large store is a scan, so at most every 5 s

    def users_in_store() -> int:
        if time.monotonic() - counted[0] > 5.0:
            counted[:] = [time.monotonic(), service.store.count_users()]
        return counted[1]

    @app.get("/health", response_model=Health, operation_id="health")
    def health():
        return {
            "status": "ok",
            "model": service.scoring.name,
            "items": service.scoring.n_items,
            "t_max": service.t_max,
            "store": type(service.store).__name__,
            "users_in_store": users_in_store(),
            "users_in_memory": len(service.users),
            "limits": {k: v for k, v in vars(limits).items()},
            "r2led": __version__,
        }

    @app.get(
        "/users/{user}/history",
        response_model=HistoryView,
        operation_id="get_history",
        responses=_errors(keyed, 401, 404, 422),
    )
    def get_history(user: UserPath):
        items, signals = service.history(user)
        return OrjsonResponse(
            {
                "user": user,
                "length": len(items),
                "events": [{"item": i, "signal": s} for i, s in zip(items, signals, strict=False)],
            }
        )

    @app.put(
        "/users/{user}/history",
        response_model=HistorySet,
        operation_id="put_history",
        responses=_errors(keyed, 400, 401, 404, 413, 422),
    )
    def put_history(user: UserPath, body: HistoryBody):
        features = body.features.model_dump(exclude_none=True) if body.features is not None else None
        out = service.set_history(user, [str(e.item) for e in body.events], [e.signal for e in body.events], features)
        return OrjsonResponse(out)

    @app.post(
        "/users/{user}/events",
        response_model=Appended,
        operation_id="append_events",
        responses=_errors(keyed, 400, 401, 404, 413, 422),
    )
    def append_events(user: UserPath, body: EventsBody):
        return OrjsonResponse(service.append(user, [str(e.item) for e in body.events], [e.signal for e in body.events]))

    @app.post("/score", response_model=Scores, operation_id="score", responses=_errors(keyed, 400, 401, 404, 413, 422))
    async def score(body: ScoreBody):
        # a well-formed request is answered by ScoreRoute before it gets here; this route
        # answers the others (e.g. 7.0 as a key) the same way, and is what the schema describes.
        # Scored on the event loop's thread, like ScoreRoute does (see r2led.serve.score_route)
        scored = service.score(body.user, body.candidates)  # keys (str or int) made str there
        answer, timing = score_answer(body.user, scored)
        return Response(answer, media_type="application/json", headers={"server-timing": timing.decode()})

    app.openapi = lambda: _openapi(app, keyed)
    return Guards(ScoreRoute(app, service, limits), api_keys, limits.max_body_bytes)


def _where(loc, limit: int) -> str:
    """``body.candidates.0`` from pydantic's location, without its union-branch tags; a part
    longer than ``limit`` is cut there."""
    parts = (
        str(p) if isinstance(p, int) else p if len(p) <= limit else f"{p[:limit]}..."
        for p in loc
        if isinstance(p, int) or not any(c in p for c in "[(-") and p not in ("str", "int")
    )
    return ".".join(parts)  # a part can be a client's field name: clipped like any echoed value


def _allowed_methods(app: FastAPI, scope) -> set[str]:
    from starlette.routing import Match

    methods = set()
    for route in app.router.routes:
        if getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return methods


LINKS = {
    "ScoreThisUser": {
        "operationId": "score",
        "requestBody": {"user": "$request.path.user"},
        "description": "score candidates for this user",
    },
    "AppendToThisUser": {"operationId": "append_events", "parameters": {"path.user": "$request.path.user"}},
    "ReadThisHistory": {"operationId": "get_history", "parameters": {"path.user": "$request.path.user"}},
}


def _openapi(app: FastAPI, keyed: bool) -> dict:
    """FastAPI's schema plus the API key scheme and the links between routes."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=__doc__.split("\n\n")[0]
        )
        paths = schema["paths"]
        for name in ("put_history", "append_events"):
            path, method = (
                ("/users/{user}/history", "put") if name == "put_history" else ("/users/{user}/events", "post")
            )
            paths[path][method]["responses"]["200"]["links"] = {
                k: v for k, v in LINKS.items() if v["operationId"] != name
            }
        if keyed:
            schema.setdefault("components", {})["securitySchemes"] = {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            }
            for path, ops in paths.items():
                if path not in OPEN_PATHS:
                    for op in ops.values():
                        op["security"] = [{"ApiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema
