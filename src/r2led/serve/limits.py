"""What one request may hold, and who may send it: ``Limits`` and API keys.

Every limit is configurable on ``r2led serve`` and stated in the OpenAPI schema; a request past
one is refused with 413 (the body cap) or 422 (counts and lengths), with a short body.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from r2led.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """Per-request caps of the service."""

    max_body_bytes: int = 4 << 20  # request body cap (413 past it)
    max_candidates: int = 1000  # candidates per /score request
    max_key_length: int = 256  # characters of a user or item key
    max_events: int = 1000  # events per append (POST /users/{user}/events)

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")


def read_api_keys(path: str | Path) -> frozenset[str]:
    """API keys from a file: one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc}") from exc
    keys = frozenset(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ConfigError(f"the API key file {path} holds no key (one key a line)")
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ConfigError(
            f"the API key file {path} holds a key of {len(short[0])} characters; "
            "use at least 16 (e.g. `openssl rand -hex 24`)"
        )
    return keys
