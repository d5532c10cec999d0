"""The reassignment protocol end to end on real parts: ingest (in-process), Valkey, bridge, Kafka, worker,
reassignment sink (processes), query API; agents on the real client library."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from heartbeat_registry.beats import heartbeat
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tokens import ASSIGNER, mint
from heartbeat_registry.hbreg.simulate import Fleet
from heartbeat_registry.pb import hb, hb_grpc
from tests import procs
from tests.conftest import BOTH_REDIS
from tests.kafka_helpers import eventually, read_events
from tests.processors.conftest import running_pipeline
from tests.sinks.conftest import reassignments, start_sink

pytestmark = [pytest.mark.kafka, pytest.mark.slow, BOTH_REDIS]
SECRET = "recovery-test-secret-0123456789-0123456789"


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def api(settings: Settings, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{settings.http_addr}{path}", timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_killed_agents_task_is_reassigned_fenced_and_taken_over(pipeline_settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(pipeline_settings, auth=True, auth_secret=SECRET, stall_timeout=2.0)
    agent_token = lambda agent: mint(SECRET.encode(), agent, 3600)  # noqa: E731
    async with running_pipeline(settings, tmp_path, query=True) as pipeline:
        sink = await start_sink(settings, tmp_path / "reassign.log")
        tasks = {"owner-1": "job-e2e", "bystander": "job-b", "idle-1": "", "idle-2": ""}
        fleet = Fleet(
            settings.grpc_addr, list(tasks), interval=0.2, jitter=0.2, token_for=agent_token, task_of=tasks.__getitem__
        )
        try:
            await fleet.start()
            await asyncio.sleep(3)
            await fleet.kill("owner-1")
            found = await reassignments(settings, until=1, timeout=settings.stall_timeout + 10, settle=1.0)
            assert [(r.task_id, r.from_agent_id, r.epoch) for r in found] == [("job-e2e", "owner-1", 1)]
            events = await read_events(
                settings.kafka_bootstrap,
                Names.of(settings).events_topic,
                lambda es: any(e.type == hb.STALL for e in es),
                timeout=5,
            )
            stall = next(e for e in events if e.type == hb.STALL and e.agent_id == "owner-1")
            assert found[0].stall_event_id == stall.event_id
            assert found[0].emitted_at_ms - stall.emitted_at_ms <= 1000, "reassigned later than 1 s after the stall"

            # the stalled agent, back and still reporting the task: ABANDON in its very next reply
            reply = await pipeline.stub.Beat(
                heartbeat("owner-1", "job-e2e", hb.RUNNING, 0.5), metadata=bearer(agent_token("owner-1"))
            )
            assert [(d.kind, d.task_id, d.epoch) for d in reply.directives] == [(hb.Directive.ABANDON, "job-e2e", 1)]

            async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
                tasks_stub = hb_grpc.TaskServiceStub(channel)
                request = hb.AssignRequest(task_id="job-e2e", agent_id="idle-1", epoch=1)
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await tasks_stub.Assign(request, metadata=bearer(agent_token("idle-1")))
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                service = bearer(mint(SECRET.encode(), "test-assigner", 600, role=ASSIGNER))
                with pytest.raises(grpc.aio.AioRpcError) as stale:
                    await tasks_stub.Assign(
                        hb.AssignRequest(task_id="job-e2e", agent_id="idle-1", epoch=0), metadata=service
                    )
                assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "epoch 1" in stale.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await tasks_stub.Assign(
                        hb.AssignRequest(task_id="job-none", agent_id="idle-1", epoch=1), metadata=service
                    )
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
                assigned = await tasks_stub.Assign(request, metadata=service)
                assert (assigned.state, assigned.owner, assigned.epoch) == (hb.TASK_ASSIGNED, "idle-1", 1)

            # the assignee hears ASSIGN, beats RUNNING on the task and owns it
            await eventually(lambda: any(a == "idle-1" for a, _ in fleet.taken), 10)

            async def owned() -> bool:
                status, task = await asyncio.to_thread(api, settings, "/api/tasks/job-e2e")
                return status == 200 and task["state"] == "running" and task["owner"] == "idle-1"

            await eventually(owned, 10)
            _, task = await asyncio.to_thread(api, settings, "/api/tasks/job-e2e")
            assert task["epoch"] == 1
            assert [(c["epoch"], c["agent_id"], c["what"]) for c in task["history"]] == [
                (0, "owner-1", "running"),
                (1, "owner-1", "orphaned"),
                (1, "idle-1", "assigned"),
                (1, "idle-1", "running"),
            ]
            status, listed = await asyncio.to_thread(api, settings, "/api/tasks?state=running")
            assert status == 200 and {"job-e2e", "job-b"} <= {t["task_id"] for t in listed["tasks"]}
            status, orphaned = await asyncio.to_thread(api, settings, "/api/tasks?state=orphaned")
            assert status == 200 and orphaned["tasks"] == []
            status, _ = await asyncio.to_thread(api, settings, "/api/tasks?state=lost")
            assert status == 400
        finally:
            await fleet.stop()
            procs.stop(sink)


async def test_a_mass_silence_reassigns_nothing_until_the_agents_are_confirmed(
    pipeline_settings: Settings, tmp_path
) -> None:
    """80% of a partition cut off at once: no reassignment while the mass silence holds them; once the
    hold ends and they are stalled one by one, each task is reassigned (the positive control)."""
    settings = dataclasses.replace(
        pipeline_settings,
        topic_partitions=1,
        stream_shards=1,
        stall_timeout=2.0,
        mass_silence_hold=6.0,
        reassign_rate=1000.0,
        reassign_burst=1000.0,
    )
    async with running_pipeline(settings, tmp_path):
        sink = await start_sink(settings, tmp_path / "reassign.log")
        agents = [f"m{i:02d}" for i in range(50)]
        fleet = Fleet(settings.grpc_addr, agents, interval=0.2, jitter=0.3)
        try:
            await fleet.start()
            await asyncio.sleep(3)
            cut = agents[:40]
            await asyncio.gather(*(fleet.kill(a) for a in cut))
            cut_at = time.time()
            early = await reassignments(settings, until=1, timeout=settings.mass_silence_hold - 1, settle=0)
            assert early == [], "reassigned during the mass silence"
            found = await reassignments(settings, until=len(cut), timeout=30, settle=2.0)
        finally:
            await fleet.stop()
            procs.stop(sink)
    assert sorted(r.task_id for r in found) == sorted(f"{a}-task" for a in cut)
    assert min(r.emitted_at_ms for r in found) / 1000 >= cut_at + settings.mass_silence_hold - 1
