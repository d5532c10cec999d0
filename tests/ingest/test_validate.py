from __future__ import annotations

import pytest

from heartbeat_registry.pb import hb
from ingest import validate


def good(**changes) -> hb.Heartbeat:
    beat = hb.Heartbeat(agent_id="agent-1", task_id="t-1", status=hb.RUNNING, timestamp=1_700_000_000_000, cpu_util=0.5)
    for key, value in changes.items():
        setattr(beat, key, value)
    return beat


def test_good_heartbeat_passes() -> None:
    validate.check(good())
    validate.check(good(task_id="", status=hb.IDLE, cpu_util=0.0))
    validate.check(good(cpu_util=1.0, progress=1.0))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"agent_id": ""}, "agent_id"),
        ({"agent_id": "has space"}, "agent_id"),
        ({"agent_id": "-leading"}, "agent_id"),
        ({"agent_id": "x" * 129}, "agent_id"),
        ({"task_id": "bad\ttask"}, "task_id"),
        ({"status": hb.STATUS_UNSPECIFIED}, "status"),
        ({"status": 42}, "status"),
        ({"cpu_util": float("nan")}, "cpu_util"),
        ({"cpu_util": 1.5}, "cpu_util"),
        ({"cpu_util": -0.1}, "cpu_util"),
        ({"cpu_util": float("inf")}, "cpu_util"),
        ({"timestamp": 0}, "timestamp"),
        ({"progress": 2.0}, "progress"),
        ({"progress": float("nan")}, "progress"),
    ],
)
def test_refusal_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(validate.Refusal) as err:
        validate.check(good(**changes))
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
