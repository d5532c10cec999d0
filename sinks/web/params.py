"""The query API's parameters: each parsed once, and each refusal a 400 that names the parameter."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.settings import PARSERS

MAX_COUNT = 1_000_000  # no answer is longer; Redis refuses ranges beyond 64-bit integers
EPOCH_MS = re.compile(r"-?[0-9]+")  # ASCII digits: str.isdigit() also takes '²', which int() refuses


class BadRequest(Exception):
    """A parameter the API refuses; the message starts with the parameter's name."""


class NotFound(Exception):
    """What a request names (an agent, a task) is not known: a 404."""


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
    if value > MAX_COUNT:
        raise BadRequest(f"{name}: at most {MAX_COUNT}, got {value}")
    return value


def instant(request: web.Request, name: str, default: int) -> int:
    """A point in time: epoch milliseconds (`1795622000000`) or a duration ago (`5m`, `1h`, `30s`)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if EPOCH_MS.fullmatch(raw):
        try:
            value = int(raw)
        except ValueError:  # more digits than int() takes
            raise BadRequest(f"{name}: expected epoch milliseconds, got {len(raw)} digits") from None
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


def window_size(request: web.Request, window_ms: int, max_windows: int) -> int:
    """`size`: a multiple of the tumbling window (hopping windows), as a duration; each hopping window is
    merged from the tumbling ones it spans, so it may span at most `max_windows` of them."""
    raw = request.query.get("size")
    if raw is None:
        return window_ms
    parse, _ = PARSERS["seconds"]
    try:
        size_ms = int(round(parse(raw) * 1000))
    except ValueError:
        raise BadRequest(f"size: expected a duration such as 10s or 60s, got {raw!r}") from None
    if size_ms <= 0 or size_ms % window_ms:
        raise BadRequest(f"size: must be a multiple of the {window_ms / 1000:g}s tumbling window, got {raw!r}")
    if size_ms // window_ms > max_windows:
        raise BadRequest(f"size: at most {max_windows} tumbling windows of {window_ms / 1000:g}s, got {raw!r}")
    return size_ms


def choice(request: web.Request, name: str, allowed: tuple[str, ...] | list[str]) -> str | None:
    raw = request.query.get(name)
    if raw is not None and raw not in allowed:
        raise BadRequest(f"{name}: must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


# Alertmanager's webhook payload (https://prometheus.io/docs/alerting/latest/configuration/#webhook_config):
# the fields its readers (`hbreg alerts`, the dashboard) use, by the JSON type they must have when present
TEXT_FIELDS = ("version", "groupKey", "status", "receiver", "externalURL")
LABEL_FIELDS = ("groupLabels", "commonLabels", "commonAnnotations")
ALERT_TEXT_FIELDS = ("status", "startsAt", "endsAt", "generatorURL", "fingerprint")
ALERT_LABEL_FIELDS = ("labels", "annotations")


def notification(body: Any) -> dict[str, Any]:
    """An Alertmanager webhook notification, checked field by field (the error names the first wrong one):
    what the receiver keeps, every reader can show."""
    if not isinstance(body, dict):
        raise BadRequest(f"body: expected a JSON object (Alertmanager's webhook payload), got {_kind(body)}")
    alerts = body.get("alerts")
    if not isinstance(alerts, list):
        raise BadRequest(f"alerts: expected a list (Alertmanager's webhook payload), got {_kind(alerts)}")
    _fields(body, "", TEXT_FIELDS, LABEL_FIELDS)
    truncated = body.get("truncatedAlerts", 0)
    if type(truncated) is not int or truncated < 0:
        got = truncated if type(truncated) is int else _kind(truncated)
        raise BadRequest(f"truncatedAlerts: expected a whole number >= 0, got {got}")
    for i, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise BadRequest(f"alerts[{i}]: expected an object, got {_kind(alert)}")
        _fields(alert, f"alerts[{i}].", ALERT_TEXT_FIELDS, ALERT_LABEL_FIELDS)
    return body


def _fields(obj: dict[str, Any], at: str, texts: tuple[str, ...], label_sets: tuple[str, ...]) -> None:
    for name in texts:
        if name in obj and not isinstance(obj[name], str):
            raise BadRequest(f"{at}{name}: expected a string, got {_kind(obj[name])}")
    for name in label_sets:
        value = obj.get(name, {})
        if not isinstance(value, dict):
            raise BadRequest(f"{at}{name}: expected an object of strings, got {_kind(value)}")
        for key, item in value.items():
            if not isinstance(item, str):
                raise BadRequest(f"{at}{name}: expected an object of strings, {key[:40]!r} is {_kind(item)}")


def _kind(value: Any) -> str:
    """A JSON value's type in JSON's words, for error messages (never the value: it may be large)."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
