"""TaskService when the task registry (Redis) is unreachable or slow: UNAVAILABLE, which the assigner
retries, never the INTERNAL grpc makes of an unexpected exception (found by the chaos soak: a cut link
between an ingest and Redis made every Assign call fail with INTERNAL)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from heartbeat_registry.pb import hb
from ingest.auth import Identity
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
