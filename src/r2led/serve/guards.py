"""ASGI middleware in front of every route: API keys, then the request body cap.

- ``X-API-Key`` (or ``Authorization: Bearer KEY``) must be one of the service's keys on every
  path except ``/health``, the schema and ``/docs`` included: 401 otherwise.
- A body larger than ``max_body_bytes`` is refused with 413 before it is read whole: at once
  when ``Content-Length`` says so, and as soon as a streamed (chunked) body passes the cap (such a body is read
  up to the cap, then handed on).
Both answer a short JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import hmac

import orjson

OPEN_PATHS = frozenset({"/health"})


async def send_json(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer with a JSON ``body`` already serialised (ASGI ``send``)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer ``{"detail": detail}``, as FastAPI's errors do."""
    await send_json(send, status, orjson.dumps({"detail": detail}), headers)


async def read_body(receive, cap: int | None = None) -> bytes | None:
    """The request body, read whole from ASGI ``receive``; with ``cap``, reading stops as soon as
    it is longer (the caller refuses it). ``None``: the client went away."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if cap is not None and size > cap:
            break
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Guards:
    """API key check and body cap, as one ASGI middleware (see the module docstring)."""

    def __init__(self, app, api_keys: frozenset[str] | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, int(max_body_bytes)
        self.api_keys = [k.encode() for k in api_keys] if api_keys else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_keys is not None and scope["path"] not in OPEN_PATHS and not self._authorised(headers):
            return await reply(
                send,
                401,
                "missing or unknown API key: send it in the X-API-Key header",
                [(b"www-authenticate", b'APIKey header="X-API-Key"')],
            )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await reply(send, 413, f"request body is larger than the limit of {self.max_body_bytes:,} bytes")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # a streamed (chunked) body: read it up to the cap, then hand it on whole
            body = await read_body(receive, self.max_body_bytes)
            if body is None:
                return
            if len(body) > self.max_body_bytes:
                return await reply(send, 413, f"request body is larger than the limit of {self.max_body_bytes:,} bytes")
            return await self.app(scope, replay_body(body, receive), send)
        await self.app(scope, receive, send)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        key = headers.get(b"x-api-key")
        if key is None:
            auth = headers.get(b"authorization", b"")
            key = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
        return key is not None and any(hmac.compare_digest(key, k) for k in self.api_keys)


def replay_body(body: bytes, receive):
    """An ASGI ``receive`` that hands on ``body`` whole (already read), then whatever the
    connection sends next."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
