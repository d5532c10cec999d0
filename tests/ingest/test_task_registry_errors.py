"""The task registry (Redis) unreachable or slow. TaskService answers UNAVAILABLE, which the assigner
retries, never the INTERNAL grpc makes of an unexpected exception (found by the chaos soak: a cut link
between an ingest and Redis made every Assign call fail with INTERNAL). A heartbeat that takes up an
offered task is acknowledged even when taking it up fails, and the next one takes it up."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from heartbeat_registry.core.tasks import ASSIGNED, RUNNING
from heartbeat_registry.pb import hb, hb_grpc
from ingest.auth import Identity
from ingest.server import Ingest
from ingest.tasks import TaskService


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Registry:
    """A task registry whose Redis fails the way redis-py does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def __call__(self, *_: Any) -> Any:
        raise self.error

    def __getattr__(self, name: str) -> Any:
        return self


ASSIGNER = Identity("role-assignment", role="assigner")
CALLS = [
    ("Assign", hb.AssignRequest(task_id="t1", agent_id="a1", epoch=1)),
    ("GetTask", hb.GetTaskRequest(task_id="t1")),
    ("ListTasks", hb.ListTasksRequest()),
]


@pytest.mark.parametrize("error", [RedisConnectionError("Connection refused"), TimeoutError("Timeout reading")])
@pytest.mark.parametrize(("rpc", "request_"), CALLS)
async def test_unreachable_registry_is_unavailable(error: Exception, rpc: str, request_: Any) -> None:
    service = TaskService(Registry(error), 10.0)  # type: ignore[arg-type]
    with pytest.raises(Aborted) as refused:
        await getattr(service, rpc)(request_, Context(), ASSIGNER)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "task registry is unreachable" in str(refused.value)


async def test_a_refusal_of_its_own_is_not_turned_into_unavailable() -> None:
    """Positive control: the guard lets the service's own aborts (here PERMISSION_DENIED) through."""
    service = TaskService(Registry(TimeoutError()), 10.0)  # type: ignore[arg-type]
    with pytest.raises(Aborted) as refused:
        await service.GetTask(hb.GetTaskRequest(task_id="t1"), Context(), Identity("agent-1"))
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_beat_that_takes_up_a_task_is_acknowledged_when_the_registry_fails(
    ingest: Ingest, stub: hb_grpc.HeartbeatServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos soak: a confirmation's ConnectionError escaped the servicer and ended the agent's stream
    as INTERNAL, though its heartbeat was stored."""
    store = ingest.tasks
    await store.orphan_many([("job-c", "a0", "silent", "a0:1:stall", "ev:0:1", 1)])
    assert (await store.assign("job-c", "a9", 1, 30_000)).outcome == "ok"
    confirm = store.confirm
    calls = []

    async def failing_once(*args: Any) -> int | None:
        calls.append(args)
        if len(calls) == 1:
            raise RedisConnectionError("Connection closed by server.")
        return await confirm(*args)

    monkeypatch.setattr(store, "confirm", failing_once)

    def running(seq: int) -> hb.Heartbeat:
        now = int(time.time() * 1000)
        return hb.Heartbeat(agent_id="a9", task_id="job-c", status=hb.RUNNING, timestamp=now, seq=seq)

    assert (await stub.Beat(running(1), timeout=5)).seq == 1
    record = await store.get("job-c")
    assert record is not None and record["state"] == ASSIGNED  # not taken up yet
    assert (await stub.Beat(running(2), timeout=5)).seq == 2
    record = await store.get("job-c")
    assert record is not None and (record["state"], record["owner"], record["epoch"]) == (RUNNING, "a9", 1)
    assert len(calls) == 2
