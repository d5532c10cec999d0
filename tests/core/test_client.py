"""The agent-side client library against the real ingest (and Valkey)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import grpc
import pytest
import redis.asyncio as aioredis

from heartbeat_registry import registry
from heartbeat_registry.client import AsyncHeartbeatClient, CpuSampler, HeartbeatClient, TaskAbandoned
from heartbeat_registry.names import Names, partition_of
from heartbeat_registry.pb import hb, hb_grpc
from heartbeat_registry.settings import Settings
from ingest.auth import mint
from ingest.server import Ingest
from tests.kafka_helpers import eventually

SECRET = "client-test-secret-0123456789-0123456789"


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, auth=True, auth_secret=SECRET)


@pytest.fixture
async def ingest(auth_settings: Settings):
    node = Ingest(auth_settings)
    await node.start()
    yield node
    await node.stop(grace=0.5)


async def latest(settings: Settings, agent: str) -> dict | None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        value = await client.hget(Names.of(settings).latest(partition_of(agent, settings.stream_shards)), agent)
    finally:
        await client.aclose()
    return registry.decode(agent, value) if value else None


def token(agent: str) -> str:
    return mint(SECRET.encode(), agent, 600)


async def test_beats_in_background_and_reports_tasks(ingest, auth_settings: Settings) -> None:
    client = AsyncHeartbeatClient("agent-c", auth_settings.grpc_addr, token=token("agent-c"), interval=0.1)
    async with client:
        await eventually(lambda: client.connected, 5)
        async with client.task("job-1"):
            await eventually(lambda: latest(auth_settings, "agent-c"), 5)
            await asyncio.sleep(0.3)
            entry = await latest(auth_settings, "agent-c")
            assert (entry["task_id"], entry["status"]) == ("job-1", "RUNNING")
        await asyncio.sleep(0.3)
        assert (await latest(auth_settings, "agent-c"))["status"] == "COMPLETED"
    assert (await latest(auth_settings, "agent-c"))["status"] == "STOPPING"  # left on purpose


async def test_resumes_after_ingest_restart(auth_settings: Settings) -> None:
    node = Ingest(auth_settings)
    await node.start()
    client = AsyncHeartbeatClient("agent-r", auth_settings.grpc_addr, token=token("agent-r"), interval=0.1,
                                  backoff_initial=0.1, backoff_max=1.0)
    await client.start()
    try:
        await eventually(lambda: client.connected, 5)
        await node.stop(grace=0.2)
        await eventually(lambda: not client.connected, 5)
        report_while_down = time.monotonic()
        client.report(task_id="job-after", status=hb.RUNNING)  # never blocks, even while disconnected
        assert time.monotonic() - report_while_down < 0.01
        await asyncio.sleep(0.5)
        node = Ingest(auth_settings)
        await node.start()
        restarted = time.monotonic()
        await eventually(lambda: client.connected, 5)
        assert time.monotonic() - restarted < 2.5, "did not resume within its backoff"
        await asyncio.sleep(0.3)
        assert (await latest(auth_settings, "agent-r"))["task_id"] == "job-after"
    finally:
        await client.stop()
        await node.stop(grace=0.2)


async def test_fails_over_between_endpoints(auth_settings: Settings) -> None:
    from heartbeat_registry import embedded

    first = Ingest(auth_settings)
    second_settings = dataclasses.replace(auth_settings, grpc_addr=f"127.0.0.1:{embedded.free_port()}")
    second = Ingest(second_settings)
    await first.start()
    await second.start()
    client = AsyncHeartbeatClient("agent-f", [auth_settings.grpc_addr, second_settings.grpc_addr],
                                  token=token("agent-f"), interval=0.1, backoff_initial=0.05)
    await client.start()
    try:
        await eventually(lambda: client.connected and client.endpoint == auth_settings.grpc_addr, 5)
        await first.stop(grace=0.1)
        await eventually(lambda: client.connected and client.endpoint == second_settings.grpc_addr, 5)
    finally:
        await client.stop()
        await second.stop(grace=0.1)


async def fence(settings: Settings, agent: str, task: str, epoch: int) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    await client.hset(Names.of(settings).fenced(partition_of(agent, settings.stream_shards)), agent, f"{task} {epoch}")
    await client.aclose()


async def test_abandon_cancels_the_asyncio_task(ingest, auth_settings: Settings) -> None:
    abandoned = []
    client = AsyncHeartbeatClient("agent-a", auth_settings.grpc_addr, token=token("agent-a"), interval=0.05,
                                  on_abandon=abandoned.append)
    async with client:
        work_done = False

        async def work() -> None:
            nonlocal work_done
            async with client.task("job-9"):
                await fence(auth_settings, "agent-a", "job-9", 4)
                await asyncio.sleep(30)
                work_done = True

        with pytest.raises(TaskAbandoned) as err:
            await asyncio.wait_for(work(), 5)
        assert not work_done
        assert err.value.directive.task_id == "job-9" and err.value.directive.epoch == 4
        assert [(d.task_id, d.epoch) for d in abandoned] == [("job-9", 4)]
        assert client.task_id == "" and client.status == hb.IDLE


async def test_abandon_sets_the_threaded_context(ingest, auth_settings: Settings) -> None:
    abandoned = threading.Event()

    def run() -> tuple[bool, int]:
        with HeartbeatClient("agent-t", auth_settings.grpc_addr, token=token("agent-t"), interval=0.05,
                             on_abandon=lambda d: abandoned.set()) as client:
            with client.task("job-7") as ctx:
                asyncio.run(fence(auth_settings, "agent-t", "job-7", 2))
                steps = 0
                while not ctx.cancelled.wait(0.01) and steps < 500:
                    steps += 1
                return ctx.cancelled.is_set(), ctx.directive.epoch if ctx.directive else -1

    cancelled, epoch = await asyncio.to_thread(run)
    assert cancelled and epoch == 2 and abandoned.is_set()


class UnaryOnly(hb_grpc.HeartbeatServiceServicer):
    """An ingest (or proxy) that offers unary Beat only: BeatStream answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.beats: list[hb.Heartbeat] = []

    async def Beat(self, request, context):
        self.beats.append(request)
        return hb.BeatReply(seq=request.seq, received_ms=int(time.time() * 1000))


async def test_falls_back_to_unary_beat(settings: Settings) -> None:
    server = grpc.aio.server()
    servicer = UnaryOnly()
    hb_grpc.add_HeartbeatServiceServicer_to_server(servicer, server)
    server.add_insecure_port(settings.grpc_addr)
    await server.start()
    client = AsyncHeartbeatClient("agent-u", settings.grpc_addr, interval=0.05, sample_cpu=False)
    try:
        async with client:
            await eventually(lambda: len(servicer.beats) >= 3, 5)
        assert not client.use_stream
    finally:
        await server.stop(0)


def test_cpu_sample_is_a_fraction() -> None:
    sampler = CpuSampler()
    end = time.monotonic() + 0.2
    while time.monotonic() < end:
        pass
    assert 0.0 < sampler.sample() <= 1.0
