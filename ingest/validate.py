"""Heartbeat validation: every refusal names the field and what it expects.

This runs for every heartbeat on the hot path, so the checks are ordered cheapest first and ids that
already passed the character-set check are remembered (a fleet repeats the same ids every beat).
"""

from __future__ import annotations

import re

from heartbeat_registry.pb import hb

MAX_ID_LEN = 128
MAX_TASK_LEN = 256
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]*")
_VALID_STATUSES = frozenset(v for v in hb.Status.values() if v != hb.STATUS_UNSPECIFIED)
_STATUS_WORDS = ", ".join(hb.Status.Name(v) for v in sorted(_VALID_STATUSES))
_KNOWN_IDS: set[str] = set()
_KNOWN_IDS_LIMIT = 1 << 20


class Refusal(ValueError):
    """A heartbeat (or request) that is refused; `field` is what the message is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_id(value: str, field: str, limit: int = MAX_ID_LEN) -> None:
    if value in _KNOWN_IDS:
        return
    if len(value) > limit:
        raise Refusal(field, f"longer than {limit} characters ({len(value)})")
    if not _ID_RE.fullmatch(value):
        raise Refusal(field, "must start with a letter or digit and use only letters, digits and . _ : @ / -")
    if len(_KNOWN_IDS) >= _KNOWN_IDS_LIMIT:
        _KNOWN_IDS.clear()
    _KNOWN_IDS.add(value)


def _span(ms: int) -> str:
    seconds = abs(ms) / 1000
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


# (agent_id, task_id, status, timestamp, cpu_util, progress or None)
Fields = tuple[str, str, int, int, float, float | None]


def fields_of(beat: hb.Heartbeat) -> Fields:
    """(agent_id, task_id, status, timestamp, cpu_util, progress or None), each read once: every read of
    a protobuf field builds a new Python object, and the hot path would otherwise read them thrice."""
    return (
        beat.agent_id,
        beat.task_id,
        beat.status,
        beat.timestamp,
        beat.cpu_util,
        beat.progress if beat.HasField("progress") else None,
    )


def check(beat: hb.Heartbeat, now_ms: int = 0, max_skew_ms: int = 0) -> None:
    """Raise Refusal for the first thing wrong with `beat`."""
    check_fields(*fields_of(beat), now_ms, max_skew_ms)


def check_fields(
    agent: str,
    task: str,
    status: int,
    timestamp: int,
    cpu: float,
    progress: float | None,
    now_ms: int,
    max_skew_ms: int,
) -> None:
    """Raise Refusal for the first thing wrong. With `max_skew_ms`, an agent clock further than that
    from `now_ms` is refused: the timestamp is stored for skew figures, never trusted."""
    if agent not in _KNOWN_IDS:
        if not agent:
            raise Refusal("agent_id", "must not be empty")
        check_id(agent, "agent_id", MAX_ID_LEN)
    if task and task not in _KNOWN_IDS:
        check_id(task, "task_id", MAX_TASK_LEN)
    if status not in _VALID_STATUSES:
        raise Refusal("status", f"must be one of {_STATUS_WORDS} (got {status})")
    if not 0.0 <= cpu <= 1.0:  # also refuses NaN
        raise Refusal("cpu_util", f"must be a number from 0.0 to 1.0 (got {cpu})")
    if timestamp <= 0:
        raise Refusal("timestamp", f"must be the agent clock in Unix epoch ms (got {timestamp})")
    if max_skew_ms and abs(timestamp - now_ms) > max_skew_ms:
        way = "ahead of" if timestamp > now_ms else "behind"
        raise Refusal(
            "timestamp",
            f"agent clock is {_span(timestamp - now_ms)} {way} the server clock (limit {_span(max_skew_ms)})",
        )
    if progress is not None and not 0.0 <= progress <= 1.0:
        raise Refusal("progress", f"must be a number from 0.0 to 1.0 (got {progress})")
