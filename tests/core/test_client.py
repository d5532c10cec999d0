"""The agent-side client library against the real ingest (and Valkey)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import types
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from heartbeat_registry import AsyncHeartbeatClient, HeartbeatClient, HeartbeatRejected, TaskAbandoned
from heartbeat_registry.client import CpuSampler
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tokens import mint
from heartbeat_registry.core.views import RegistryEntry
from heartbeat_registry.pb import hb, hb_grpc
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


@pytest.fixture
async def two_ingests(auth_settings: Settings):
    """Two ingest replicas on their own ports, as an agent's list of endpoints names them."""
    from heartbeat_registry.hbreg import services

    first = Ingest(auth_settings)
    second = Ingest(dataclasses.replace(auth_settings, grpc_addr=f"127.0.0.1:{services.free_port()}"))
    await first.start()
    await second.start()
    yield first, second
    await second.stop(grace=0.1)
    await first.stop(grace=0.1)


async def latest(settings: Settings, agent: str) -> RegistryEntry | None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        value = await client.hget(Names.of(settings).latest(partition_of(agent, settings.stream_shards)), agent)
    finally:
        await client.aclose()
    return RegistryEntry.decode(agent, value) if value else None


def token(agent: str) -> str:
    return mint(SECRET.encode(), agent, 600)


def both(ingests: tuple[Ingest, Ingest], agent: str, **options: Any) -> AsyncHeartbeatClient:
    """A client of both replicas, the first one first."""
    endpoints = [node.settings.grpc_addr for node in ingests]
    return AsyncHeartbeatClient(agent, endpoints, token=token(agent), **options)


async def test_beats_in_background_and_reports_tasks(ingest, auth_settings: Settings) -> None:
    client = AsyncHeartbeatClient("agent-c", auth_settings.grpc_addr, token=token("agent-c"), interval=0.1)
    async with client:
        await eventually(lambda: client.connected, 5)
        async with client.task("job-1"):
            await eventually(lambda: latest(auth_settings, "agent-c"), 5)
            await asyncio.sleep(0.3)
            entry = await latest(auth_settings, "agent-c")
            assert (entry.task_id, entry.status) == ("job-1", hb.RUNNING)
        await asyncio.sleep(0.3)
        assert (await latest(auth_settings, "agent-c")).status == hb.COMPLETED
    assert (await latest(auth_settings, "agent-c")).status == hb.STOPPING  # left on purpose


async def test_resumes_after_ingest_restart(auth_settings: Settings) -> None:
    node = Ingest(auth_settings)
    await node.start()
    client = AsyncHeartbeatClient(
        "agent-r", auth_settings.grpc_addr, token=token("agent-r"), interval=0.1, backoff_initial=0.1, backoff_max=1.0
    )
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
        assert (await latest(auth_settings, "agent-r")).task_id == "job-after"
    finally:
        await client.stop()
        await node.stop(grace=0.2)


async def test_fails_over_between_endpoints(two_ingests: tuple[Ingest, Ingest]) -> None:
    first, second = two_ingests
    client = both(
        two_ingests,
        "agent-f",
        interval=0.1,
        backoff_initial=0.05,
    )
    await client.start()
    try:
        await eventually(lambda: client.connected and client.endpoint == first.settings.grpc_addr, 5)
        await first.stop(grace=0.1)
        await eventually(lambda: client.connected and client.endpoint == second.settings.grpc_addr, 5)
    finally:
        await client.stop()


async def test_goes_straight_to_the_other_endpoint_when_one_refuses(two_ingests: tuple[Ingest, Ingest]) -> None:
    """An ingest that lost Redis refuses (UNAVAILABLE): the client takes the next endpoint at once instead of
    trying the refusing one again first (found by the chaos soak: every agent on an ingest whose Redis
    link was cut lost one more beat to the retry)."""
    first, second = two_ingests
    refused = ("hbreg_ingest_heartbeats_refused_total", {"rpc": "stream", "reason": "redis_unavailable"})
    client = both(
        two_ingests,
        "agent-g",
        interval=0.1,
        backoff_initial=0.2,
    )
    await client.start()
    try:
        await eventually(lambda: client.connected and client.endpoint == first.settings.grpc_addr, 5)
        before = REGISTRY.get_sample_value(*refused) or 0.0
        first.watch.writer = types.SimpleNamespace()  # the watch would find Redis reachable again
        first.writer.available = False  # as after a failed write: refuse at once
        await eventually(lambda: client.connected and client.endpoint == second.settings.grpc_addr, 5)
        await asyncio.sleep(1.0)  # it stays there
        assert client.endpoint == second.settings.grpc_addr
        assert (REGISTRY.get_sample_value(*refused) or 0.0) - before == 1, "tried the refusing ingest again"
    finally:
        await client.stop()


async def test_a_beat_left_unanswered_is_sent_again_to_the_other_endpoint(two_ingests: tuple[Ingest, Ingest]) -> None:
    """An ingest whose Redis link hangs never answers: after `rpc_timeout` the client sends the same beat
    (same seq) to the other ingest, so that beat is acknowledged within a second of being built instead
    of lost (found by the chaos soak: every ingest–Redis partition cost each of its agents a beat)."""
    first, second = two_ingests
    sent: dict[int, float] = {}
    answered: dict[int, float] = {}
    client = both(
        two_ingests,
        "agent-h",
        interval=0.5,
        rpc_timeout=0.3,
        on_sent=lambda beat: sent.setdefault(beat.seq, time.monotonic()),
        on_reply=lambda reply: answered.setdefault(reply.seq, time.monotonic()),
    )
    await client.start()
    try:
        await eventually(lambda: client.connected and client.endpoint == first.settings.grpc_addr, 5)
        await eventually(lambda: len(answered) >= 3, 5)

        async def hang(*beat: object) -> None:
            await asyncio.Event().wait()

        first.writer.write_one = hang  # type: ignore[method-assign]
        hung_from = max(sent)
        await eventually(lambda: client.endpoint == second.settings.grpc_addr and len(answered) >= hung_from + 3, 5)
        unanswered = sorted(set(range(1, max(answered))) - set(answered))
        assert unanswered == [], f"beats never acknowledged: {unanswered}"
        slowest = max(answered[seq] - sent[seq] for seq in range(hung_from, max(answered)))
        assert slowest < 1.0, f"a beat took {slowest:.2f} s to be acknowledged"
    finally:
        await client.stop()


async def fence(settings: Settings, agent: str, task: str, epoch: int) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    await client.hset(Names.of(settings).fenced(partition_of(agent, settings.stream_shards)), agent, f"{task} {epoch}")
    await client.aclose()


async def test_abandon_cancels_the_asyncio_task(ingest, auth_settings: Settings) -> None:
    abandoned = []
    client = AsyncHeartbeatClient(
        "agent-a", auth_settings.grpc_addr, token=token("agent-a"), interval=0.05, on_abandon=abandoned.append
    )
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
        with (
            HeartbeatClient(
                "agent-t",
                auth_settings.grpc_addr,
                token=token("agent-t"),
                interval=0.05,
                on_abandon=lambda d: abandoned.set(),
            ) as client,
            client.task("job-7") as ctx,
        ):
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


def test_cpu_sample_follows_the_process_load() -> None:
    """Busy on one thread, the process uses a visible share of its allotment; asleep, next to none."""
    sampler = CpuSampler()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    busy = sampler.sample()
    time.sleep(0.3)
    idle = sampler.sample()
    assert busy > 0.5 / sampler.allotment, (busy, sampler.allotment)  # at least half a core
    assert idle < busy / 4, (idle, busy)


def refused(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("hbreg_ingest_heartbeats_refused_total", {"rpc": "stream", "reason": reason}) or 0.0
    )


async def test_a_refusal_retrying_cannot_fix_stops_the_client_and_reaches_the_program(
    ingest, auth_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A token for another agent: PERMISSION_DENIED is said plainly in the log message itself, the
    client stops instead of retrying, `on_error` hears it and the task block raises it."""
    before = refused("identity")
    rejected: list[HeartbeatRejected] = []
    client = AsyncHeartbeatClient(
        "agent-x",
        auth_settings.grpc_addr,
        token=token("someone-else"),
        interval=0.05,
        backoff_initial=0.05,
        on_error=rejected.append,
    )
    with caplog.at_level(logging.WARNING, logger="heartbeat_registry.client"):
        async with client:
            with pytest.raises(HeartbeatRejected) as err:
                async with client.task("job-1"):
                    await asyncio.sleep(10)
            await asyncio.sleep(1.0)  # time enough for many retries, were it retrying
            with pytest.raises(HeartbeatRejected):
                client.report(status=hb.IDLE)
    assert err.value.code == "PERMISSION_DENIED" and "agent-x" in err.value.details
    assert rejected == [client.error] and client.error is err.value
    assert refused("identity") - before == 1, "the client kept calling after a final refusal"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("PERMISSION_DENIED" in m and "agent-x" in m for m in errors), errors


async def test_the_threaded_client_reports_a_final_refusal_on_the_task_context(ingest, auth_settings: Settings) -> None:
    def run() -> tuple[bool, str | None]:
        with HeartbeatClient("agent-y", auth_settings.grpc_addr, token="not-a-token", interval=0.05) as client:
            try:
                with client.task("job-2") as ctx:
                    ctx.cancelled.wait(5)
                    return ctx.cancelled.is_set(), ctx.error.code if ctx.error else None
            except HeartbeatRejected as exc:  # refused before the block began
                return True, exc.code

    cancelled, code = await asyncio.to_thread(run)
    assert cancelled and code == "UNAUTHENTICATED"


async def test_stop_always_returns_while_replies_race_the_cancellation(ingest, auth_settings: Settings) -> None:
    """Stopping a client whose replies arrive every millisecond, many times over: a cancellation that
    lands as a reply completes must still end the loop (Python 3.11's wait_for could swallow it)."""
    client = AsyncHeartbeatClient(
        "agent-s", auth_settings.grpc_addr, token=token("agent-s"), interval=0.001, jitter=0.0, sample_cpu=False
    )
    for _ in range(150):
        before = client.beats_acknowledged
        await client.start()
        # replies are flowing before the stop
        await eventually(lambda before=before: client.beats_acknowledged > before, 5, every=0.001)
        await asyncio.sleep(0.003)
        await asyncio.wait_for(client.stop(leave=False), 5)
    assert client.beats_acknowledged >= 150
