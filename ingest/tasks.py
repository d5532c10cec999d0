"""`TaskService`: how the Role Assignment service hands orphaned tasks to agents, over the task registry
(core/tasks.py). Only service tokens (`role: assigner`) may call it; an agent's token gets
PERMISSION_DENIED. `Assign` succeeds only at the task's current epoch: anything else is
FAILED_PRECONDITION naming the current epoch, an unknown task NOT_FOUND."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from redis.exceptions import RedisError

from heartbeat_registry.core.tasks import ASSIGNED, ORPHANED, RUNNING, TASK_STATES, TaskStore
from heartbeat_registry.pb import hb, hb_grpc
from ingest import metrics
from ingest.auth import AGENT, Identity
from ingest.validate import MAX_TASK_LEN, Refusal, check_id

STATE_OF = {RUNNING: hb.TASK_RUNNING, ORPHANED: hb.TASK_ORPHANED, ASSIGNED: hb.TASK_ASSIGNED}
NAME_OF = {v: k for k, v in STATE_OF.items()}


def task_message(task_id: str, record: dict[str, Any], history: list[dict[str, Any]]) -> hb.Task:
    state = record["state"]
    return hb.Task(
        task_id=task_id,
        owner=record.get("assignee") or record["owner"] if state == ASSIGNED else record["owner"],
        epoch=int(record["epoch"]),
        state=STATE_OF[state],
        since_ms=int(record["since"]),
        assign_deadline_ms=int(record.get("deadline") or 0),
        history=[
            hb.TaskChange(
                epoch=int(c["epoch"]), agent_id=c["agent"], what=c["what"], at_ms=int(c["at_ms"]), why=c["why"]
            )
            for c in history
        ],
    )


R = TypeVar("R")
# what the task registry (Redis) raises when it is unreachable or timing out, as redis-py and asyncio do
UNREACHABLE = (RedisError, OSError, TimeoutError)


def registry_errors(rpc: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """The task registry (Redis) unreachable or timing out is UNAVAILABLE, which the caller retries, not
    the INTERNAL grpc makes of an unexpected exception (seen in the chaos soak's network partitions)."""

    @functools.wraps(rpc)
    async def guarded(self: Any, request: Any, context: grpc.aio.ServicerContext, identity: Identity) -> R:
        try:
            return await rpc(self, request, context, identity)
        except UNREACHABLE as exc:
            metrics.TASK_CALLS.labels("unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the task registry is unreachable: {exc!r}")
            raise  # abort raises; for the type checker

    return guarded


class TaskService(hb_grpc.TaskServiceServicer):
    """Each RPC takes the caller's Identity as a third argument (the AuthInterceptor passes it)."""

    def __init__(self, store: TaskStore, assign_timeout_s: float) -> None:
        self._store = store
        self._timeout_ms = int(assign_timeout_s * 1000)

    @staticmethod
    async def _check(context: grpc.aio.ServicerContext, identity: Identity, *ids: tuple[str, str, int]) -> None:
        if identity.role == AGENT:
            metrics.TASK_CALLS.labels("permission_denied").inc()
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.agent_id!r} holds an agent's token: TaskService needs a service token "
                "(`hbreg token NAME --assigner`)",
            )
        for value, field, limit in ids:
            try:
                check_id(value, field, limit)
            except Refusal as exc:
                metrics.TASK_CALLS.labels("invalid").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _task(self, task_id: str, context: grpc.aio.ServicerContext) -> hb.Task:
        record = await self._store.get(task_id)
        if record is None:
            metrics.TASK_CALLS.labels("not_found").inc()
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task_id: {task_id!r} is not in the task registry")
        assert record is not None
        return task_message(task_id, record, await self._store.history(task_id))

    @registry_errors
    async def Assign(self, request: hb.AssignRequest, context: grpc.aio.ServicerContext, identity: Identity) -> hb.Task:
        await self._check(
            context, identity, (request.task_id, "task_id", MAX_TASK_LEN), (request.agent_id, "agent_id", MAX_TASK_LEN)
        )
        outcome = await self._store.assign(request.task_id, request.agent_id, request.epoch, self._timeout_ms)
        if outcome.outcome == "not_found":
            await self._task(request.task_id, context)  # aborts with NOT_FOUND
        if outcome.outcome == "stale":
            metrics.TASK_CALLS.labels("stale").inc()
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"epoch: {request.epoch} is not the current epoch of task {request.task_id!r}: it is at epoch "
                f"{outcome.epoch} and {outcome.agent}",
            )
        metrics.TASK_CALLS.labels("assigned").inc()
        return await self._task(request.task_id, context)

    @registry_errors
    async def GetTask(
        self, request: hb.GetTaskRequest, context: grpc.aio.ServicerContext, identity: Identity
    ) -> hb.Task:
        await self._check(context, identity, (request.task_id, "task_id", MAX_TASK_LEN))
        return await self._task(request.task_id, context)

    @registry_errors
    async def ListTasks(
        self, request: hb.ListTasksRequest, context: grpc.aio.ServicerContext, identity: Identity
    ) -> hb.ListTasksReply:
        await self._check(context, identity)
        states = [NAME_OF[request.state]] if request.state in NAME_OF else [ORPHANED, ASSIGNED]
        limit = request.limit or 1000
        tasks = []
        for state in states:
            for task_id, _ in await self._store.in_state(state, limit):
                record = await self._store.get(task_id)
                if record is not None and record["state"] in TASK_STATES:
                    tasks.append(task_message(task_id, record, []))
        return hb.ListTasksReply(tasks=tasks[:limit])
