"""The hot route: ``POST /score`` answered straight from ASGI, in front of the FastAPI app.

Almost every request a service sees is a well-formed ``/score``. ``ScoreRoute`` answers those
without FastAPI's routing, middleware stack, dependency solving and pydantic round trip: it
reads the body, parses it with orjson and checks it against exactly the rules of the route's
schema (``ScoreBody``: an object with only ``user``, a string of 1..``max_key_length``
characters, and ``candidates``, 1..``max_candidates`` item keys, each a string of
1..``max_key_length`` characters or an integer, never a boolean). A body that passes is scored
and answered as the FastAPI route answers it: the same JSON, the same ``Server-Timing`` header,
the same 404 and 422 bodies for an unknown user or item.

Both routes score on the event loop's own thread, one request at a time, in arrival order.
The model ran one request at a time anyway (``ScoringModel`` holds a lock); handing each
request to a scoring thread and back cost about 0.4 ms of CPU per request in thread wake-ups
and interpreter-lock hand-overs (measured: docs/serving.md, "The model call and the hot route"). The
price: while a request is scored (a few ms), the loop answers nothing else, so ``/health`` waits
behind the ``/score`` requests that arrived before it.

Anything else (a body that is not JSON, fails a rule, uses a float such as ``7.0`` for a key,
another content type, another path or method) is handed to the FastAPI app unchanged, with its
body replayed, so every error answer and every corner of validation comes from one place: the
schema's models and the app's exception handlers. ``test_serve.py`` checks that the two paths
answer with the same status and the same JSON.
"""

from __future__ import annotations

import orjson

from r2led.serve.errors import ScoringInputError, UnknownItemError, UnknownUserError
from r2led.serve.guards import read_body, replay_body, reply, send_json
from r2led.serve.limits import Limits
from r2led.serve.scoring_service import Scored, ScoringService

JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")


def score_answer(user: str, scored: Scored) -> tuple[bytes, bytes]:
    """The body and the ``Server-Timing`` value of a scored request (both routes send these)."""
    wall, cpu = scored.model_wall_s * 1000, scored.model_cpu_s * 1000
    body = orjson.dumps(
        {"user": user, "scores": scored.scores, "history_length": scored.history_length, "latency_ms": round(wall, 3)},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    return body, f"model;dur={wall:.3f}, model-cpu;dur={cpu:.3f}".encode()


class ScoreRoute:
    """ASGI middleware that answers well-formed ``POST /score`` requests itself (see the module
    docstring) and passes everything else to ``app``."""

    def __init__(self, app, service: ScoringService, limits: Limits):
        self.app, self.service = app, service
        self.max_key_length, self.max_candidates = limits.max_key_length, limits.max_candidates

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/score" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        # the first content-type header decides, as Starlette reads it
        content_type = next((value for name, value in scope["headers"] if name == b"content-type"), b"")
        if content_type.lower() not in JSON_TYPES:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:
            return  # the client went away
        request = self.parse(body)
        if request is None:
            return await self.app(scope, replay_body(body, receive), send)
        user, keys = request
        try:
            scored = self.service.score(user, keys)  # on the loop's thread (see the module docstring)
        except (UnknownItemError, UnknownUserError) as exc:
            return await reply(send, 404, str(exc))
        except ScoringInputError as exc:
            return await reply(send, 422, str(exc))
        answer, timing = score_answer(user, scored)
        await send_json(send, 200, answer, [(b"server-timing", timing)])

    def parse(self, body: bytes) -> tuple[str, list[str | int]] | None:
        """(user, candidate keys) of a body that ``ScoreBody`` accepts as it is; ``None`` for
        any other body (the FastAPI route then answers it)."""
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if type(request) is not dict or len(request) != 2:
            return None
        user, candidates = request.get("user"), request.get("candidates")
        longest = self.max_key_length
        if type(user) is not str or not 0 < len(user) <= longest:
            return None
        if type(candidates) is not list or not 0 < len(candidates) <= self.max_candidates:
            return None
        for key in candidates:
            kind = type(key)  # exact types: a bool is not an integer key, a float goes the long way
            if not (kind is int or (kind is str and 0 < len(key) <= longest)):
                return None
        return user, candidates  # integer keys are made str by ScoringService.score
