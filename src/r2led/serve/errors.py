"""Errors of the serving layer, and the rule that keeps them short.

Every message that quotes something a client sent goes through ``clip``: an error body never
echoes more than 100 characters of the request (a 50 MB item key comes back as its first 40
characters and its length).
"""

from __future__ import annotations

from r2led.errors import CheckpointError, R2ledError

ECHO_CHARS = 40  # characters of a client's value quoted in an error message
ECHO_TOTAL = 100  # characters of a client's data one error body may quote, all quotes together


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr`` of a client's value, cut to ``limit`` characters (with its full length noted)."""
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} chars)"


class ScoringInputError(R2ledError, ValueError):
    """A scoring request is not usable (bad signal, empty or oversize candidate list, ...): HTTP 422."""


class UnknownItemError(ScoringInputError):
    """An item key that the exported model does not know: HTTP 404."""

    def __init__(self, key: object, count: int = 1):
        self.key = key
        more = f" (and {count - 1} more unknown item keys)" if count > 1 else ""
        super().__init__(f"unknown item key {clip(key)}{more}")


class UnknownUserError(ScoringInputError):
    """A user with no history in the store and no row in the exported user table: HTTP 404."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(
            f"unknown user {clip(key)}: not in the exported user table and no history stored; "
            "PUT its history (or POST an event) first"
        )


class HistoryStoreError(R2ledError):
    """The history store cannot be opened or used (bad URL, unreachable server, corrupt file)."""


class BundleError(CheckpointError):
    """An exported bundle is missing a file, fails its hash check, or does not fit the data."""
