"""Fault tests: Redis killed and restarted under load, SIGTERM under load. Every acknowledged heartbeat
must be in Redis afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import signal
import time

import grpc
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc

from heartbeat_registry.core import redis_client
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services
from heartbeat_registry.pb import hb, hb_grpc
from ingest.server import Ingest
from ingest.writer import StreamWriter, Unavailable
from tests import procs

# unique agent timestamps near the server clock (so the skew limit accepts them)
_counter = itertools.count(int(time.time() * 1000) - 600_000)


class Load:
    """Concurrent BeatBatch callers; every heartbeat has a unique agent timestamp."""

    def __init__(self, addr: str, callers: int = 8, batch: int = 50) -> None:
        self.addr = addr
        self.callers = callers
        self.batch = batch
        self.acked: set[int] = set()
        self.refusals: list[tuple[float, grpc.StatusCode, float]] = []  # (when, code, seconds taken)
        self.stop = asyncio.Event()

    async def _caller(self, stub: hb_grpc.HeartbeatServiceStub) -> None:
        while not self.stop.is_set():
            stamps = [next(_counter) for _ in range(self.batch)]
            request = hb.BeatBatchRequest(
                heartbeats=[
                    hb.Heartbeat(agent_id=f"agent-{s % 97}", task_id="t", status=hb.RUNNING, timestamp=s, cpu_util=0.2)
                    for s in stamps
                ]
            )
            started = time.monotonic()
            try:
                await stub.BeatBatch(request, timeout=5)
                self.acked.update(stamps)
            except grpc.aio.AioRpcError as exc:
                self.refusals.append((started, exc.code(), time.monotonic() - started))
                await asyncio.sleep(0.02)

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            await asyncio.gather(*(self._caller(stub) for _ in range(self.callers)))


async def stored_stamps(redis_url: str, names: Names) -> set[int]:
    client = aioredis.Redis.from_url(redis_url)
    out: set[int] = set()
    for stream in names.streams():
        for _, fields in await client.xrange(stream):
            out.update(hb.HeartbeatColumns.FromString(fields[b"b"]).timestamp)
    await client.aclose()
    return out


async def serving(addr: str) -> int:
    async with grpc.aio.insecure_channel(addr) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return reply.status


async def test_redis_killed_and_restarted_under_load(settings: Settings, tmp_path) -> None:
    port = services.free_port()
    valkey = procs.valkey(port, tmp_path / "valkey")
    settings = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}")
    node = Ingest(settings)
    await node.start()
    load = Load(settings.grpc_addr)
    runner = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(1.0)
        acked_before = len(load.acked)
        assert acked_before > 0
        procs.stop(valkey, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.sleep(2.0)
        assert await serving(settings.grpc_addr) == health_pb2.HealthCheckResponse.NOT_SERVING
        down = [r for r in load.refusals if r[0] > killed_at + 0.5]
        assert down, "no call was refused while Redis was down"
        assert {code for _, code, _ in down} == {grpc.StatusCode.UNAVAILABLE}
        # each waited for Redis as long as HBREG_REDIS_HOLD says, no more (not its own connection timeout)
        took = sorted(took for _, _, took in down)
        assert settings.redis_hold * 0.9 <= took[0] and took[-1] < settings.redis_hold + 0.5, took

        valkey = procs.valkey(port, tmp_path / "valkey")
        restarted_at = time.monotonic()
        acked_at_restart = len(load.acked)
        while len(load.acked) <= acked_at_restart:
            assert time.monotonic() - restarted_at < 5, "the ingest did not recover by itself"
            await asyncio.sleep(0.05)
        assert await serving(settings.grpc_addr) == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(0.5)
    finally:
        load.stop.set()
        await runner
        await node.stop()
    missing = load.acked - await stored_stamps(settings.redis_url, Names.of(settings))
    procs.stop(valkey)
    assert not missing, f"{len(missing)} acknowledged heartbeats lost"


async def test_sigterm_under_load_loses_nothing_acknowledged(settings: Settings, tmp_path) -> None:
    ingest = procs.hbreg(["ingest"], settings, tmp_path / "ingest.log")
    services.wait_port("127.0.0.1", int(settings.grpc_addr.rpartition(":")[2]), 20, "ingest")
    load = Load(settings.grpc_addr, callers=16)
    runner = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(1.5)
        ingest.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(ingest.wait, 15)
    finally:
        load.stop.set()
        await runner
        procs.stop(ingest)
    assert code == 0, (tmp_path / "ingest.log").read_text()[-2000:]
    assert len(load.acked) > 1000
    missing = load.acked - await stored_stamps(settings.redis_url, Names.of(settings))
    assert not missing, f"{len(missing)} acknowledged heartbeats lost"


async def test_close_right_after_a_write_still_returns(redis: aioredis.Redis, settings: Settings) -> None:
    """close() arriving after a write woke its shard, before the shard's task ran: the task must still
    write that heartbeat and then stop (it used to consume both wake-ups as one and wait forever)."""
    names = Names.of(settings)
    writer = StreamWriter(redis, names, retention_s=600)
    writer.start()
    batch = writer.batch(int(time.time() * 1000))
    batch.add("agent-close", "t-1", hb.RUNNING, batch.received, 0.5, None, 1)
    # Both start in this order before the shard's task runs: the write queues and wakes the shard, then
    # close() sets the already set wake-up.
    pending = asyncio.create_task(writer.write(batch))
    closing = asyncio.create_task(writer.close())
    await asyncio.wait_for(closing, 5)
    assert await pending == {}
    assert await redis.hexists(names.latest(partition_of("agent-close", names.shards)), "agent-close")


async def test_after_redis_restarts_only_the_write_that_finds_out_fails(settings: Settings, tmp_path) -> None:
    """redis-py's pool hands out the connections it kept idle from before a restart of Redis, and each
    fails its next call ("Connection closed by server"). Every such failure refuses the ingest's calls until
    the next PING, so in the soak an idle pool deep enough for a burst cost a Valkey restart four more
    refusal periods over two seconds, one each time a burst reached a connection from before. The first
    failed write must close the idle ones, so the calls after it connect afresh."""
    port = services.free_port()
    valkey = procs.valkey(port, tmp_path / "valkey")
    url = f"redis://127.0.0.1:{port}"
    client = redis_client.connect(url, socket_timeout=1.0, socket_connect_timeout=1.0, retry_on_timeout=False)
    writer = StreamWriter(client, Names.of(settings), retention_s=600)
    writer.start()
    received = int(time.time() * 1000)
    try:
        await asyncio.gather(*(client.ping() for _ in range(30)))  # a burst left 30 connections in the pool
        procs.stop(valkey, signal.SIGKILL)
        valkey = procs.valkey(port, tmp_path / "valkey")
        probe = aioredis.Redis.from_url(url)
        while True:  # until it has read its append-only file and serves
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if await probe.ping():
                    break
            await asyncio.sleep(0.05)
        await probe.aclose()

        with pytest.raises(Unavailable, match="Connection closed by server"):  # the positive control
            await writer.write_one("agent-1", "t", hb.RUNNING, received, 0.1, None, 1, received)
        writer.available = True  # as RedisWatch sets it at its next PING
        replies = await asyncio.gather(*(client.ping() for _ in range(30)), return_exceptions=True)
        assert [r for r in replies if r is not True] == []
        assert await writer.write_one("agent-1", "t", hb.RUNNING, received, 0.1, None, 2, received) == {}
    finally:
        await writer.close()
        await client.aclose()
        procs.stop(valkey)


async def test_a_heartbeat_that_arrives_while_redis_restarts_waits_for_it(settings: Settings, tmp_path) -> None:
    """A heartbeat that arrives while Redis is out waits for it up to HBREG_REDIS_HOLD: refused only when
    Redis stays out longer (the control), stored and acknowledged when it is back in time. Refused at once,
    every agent opened a new call every few hundred ms through a Valkey restart, and that crowd kept the
    ingests busy for a second after Valkey was back (the chaos soak)."""
    port = services.free_port()
    valkey = procs.valkey(port, tmp_path / "valkey")
    settings = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}", redis_hold=2.0)
    node = Ingest(settings)
    await node.start()
    stamp = next(_counter)

    def beat(stamp: int) -> hb.Heartbeat:
        return hb.Heartbeat(agent_id="agent-held", task_id="t", status=hb.RUNNING, timestamp=stamp, cpu_util=0.2)

    try:
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            await stub.Beat(beat(next(_counter)), timeout=5)
            procs.stop(valkey, signal.SIGKILL)
            while await serving(settings.grpc_addr) != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.02)

            started = time.monotonic()  # the control: Redis stays out longer than the hold
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Beat(beat(next(_counter)), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert 1.8 <= time.monotonic() - started < 2.5

            held = asyncio.ensure_future(stub.Beat(beat(stamp), timeout=5))
            await asyncio.sleep(0.3)
            assert not held.done(), "refused while it should wait for Redis"
            valkey = procs.valkey(port, tmp_path / "valkey")
            reply = await held
            assert reply.received_ms > 0
    finally:
        await node.stop()
    assert stamp in await stored_stamps(settings.redis_url, Names.of(settings))
    procs.stop(valkey)
