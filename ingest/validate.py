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


def _check_id(value: str, field: str, limit: int) -> None:
    if value in _KNOWN_IDS:
        return
    if len(value) > limit:
        raise Refusal(field, f"longer than {limit} characters ({len(value)})")
    if not _ID_RE.fullmatch(value):
        raise Refusal(
            field, "must start with a letter or digit and use only letters, digits and . _ : @ / -"
        )
    if len(_KNOWN_IDS) >= _KNOWN_IDS_LIMIT:
        _KNOWN_IDS.clear()
    _KNOWN_IDS.add(value)


def check(beat: hb.Heartbeat, field_prefix: str = "") -> None:
    """Raise Refusal for the first thing wrong with `beat`."""
    if not beat.agent_id:
        raise Refusal(field_prefix + "agent_id", "must not be empty")
    _check_id(beat.agent_id, field_prefix + "agent_id", MAX_ID_LEN)
    if beat.task_id:
        _check_id(beat.task_id, field_prefix + "task_id", MAX_TASK_LEN)
    if beat.status not in _VALID_STATUSES:
        raise Refusal(field_prefix + "status", f"must be one of {_STATUS_WORDS} (got {beat.status})")
    cpu = beat.cpu_util
    if not 0.0 <= cpu <= 1.0:  # also refuses NaN
        raise Refusal(field_prefix + "cpu_util", f"must be a number from 0.0 to 1.0 (got {cpu})")
    if beat.timestamp <= 0:
        raise Refusal(
            field_prefix + "timestamp", f"must be the agent clock in Unix epoch ms (got {beat.timestamp})"
        )
    if beat.HasField("progress") and not 0.0 <= beat.progress <= 1.0:
        raise Refusal(
            field_prefix + "progress", f"must be a number from 0.0 to 1.0 (got {beat.progress})"
        )

