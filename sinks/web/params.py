"""The query API's parameters: each parsed once, and each refusal a 400 that names the parameter."""

from __future__ import annotations

from aiohttp import web

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.settings import PARSERS


class BadRequest(Exception):
    """A parameter the API refuses; the message starts with the parameter's name."""


def count(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected a whole number, got {raw!r}") from None
    if value < 0:
        raise BadRequest(f"{name}: must not be negative, got {value}")
    return value


def instant(request: web.Request, name: str, default: int) -> int:
    """A point in time: epoch milliseconds (`1795622000000`) or a duration ago (`5m`, `1h`, `30s`)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw.lstrip("-").isdigit():
        value = int(raw)
        if value < 0:
            raise BadRequest(f"{name}: must not be negative, got {value}")
        return value
    parse, _ = PARSERS["seconds"]
    try:
        return now_ms() - int(parse(raw) * 1000)
    except ValueError:
        raise BadRequest(
            f"{name}: expected epoch milliseconds or a duration ago such as 30s, 5m or 1h, got {raw!r}"
        ) from None


def window_size(request: web.Request, window_ms: int) -> int:
    """`size`: a multiple of the tumbling window (hopping windows), as a duration."""
    raw = request.query.get("size")
    if raw is None:
        return window_ms
    parse, _ = PARSERS["seconds"]
    try:
        size_ms = int(round(parse(raw) * 1000))
    except ValueError:
        raise BadRequest(f"size: expected a duration such as 10s or 60s, got {raw!r}") from None
    if size_ms % window_ms:
        raise BadRequest(f"size: must be a multiple of the {window_ms / 1000:g}s tumbling window, got {raw!r}")
    return size_ms


def choice(request: web.Request, name: str, allowed: tuple[str, ...] | list[str]) -> str | None:
    raw = request.query.get(name)
    if raw is not None and raw not in allowed:
        raise BadRequest(f"{name}: must be one of {', '.join(allowed)}, got {raw!r}")
    return raw
