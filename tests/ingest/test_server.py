"""The ingest against a real Valkey: what is acknowledged is in Redis; what is refused is not."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis.asyncio as aioredis

from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.views import RegistryEntry
from heartbeat_registry.pb import hb
from tests.conftest import BOTH_REDIS

pytestmark = BOTH_REDIS


def beat(agent: str, seq: int = 1, **changes) -> hb.Heartbeat:
    message = hb.Heartbeat(
        agent_id=agent,
        task_id=f"{agent}-t",
        status=hb.RUNNING,
        timestamp=int(time.time() * 1000),
        cpu_util=0.25,
        seq=seq,
    )
    for key, value in changes.items():
        setattr(message, key, value)
    return message


async def stored(client: aioredis.Redis, names: Names) -> list[tuple[str, int, int]]:
    """(agent_id, received_ms, status) of every heartbeat in every shard stream."""
    out = []
    for stream in names.streams():
        for _, fields in await client.xrange(stream):
            cols = hb.HeartbeatColumns.FromString(fields[b"b"])
            out.extend(zip(cols.agent_id, cols.received_ms, cols.status, strict=True))
    return out


async def test_beat_lands_in_stream_and_registry(stub, redis, settings: Settings) -> None:
    names = Names.of(settings)
    before = int(time.time() * 1000)
    reply = await stub.Beat(beat("agent-a", seq=7, cpu_util=0.4, progress=0.5))
    assert reply.seq == 7 and reply.received_ms >= before and not reply.directives
    rows = await stored(redis, names)
    assert rows == [("agent-a", reply.received_ms, hb.RUNNING)]
    shard = partition_of("agent-a", settings.stream_shards)
    entry = RegistryEntry.decode("agent-a", await redis.hget(names.latest(shard), "agent-a"))
    assert entry.last_seen_ms == reply.received_ms
    assert entry.task_id == "agent-a-t" and entry.status == hb.RUNNING
    assert entry.cpu_util == pytest.approx(0.4) and entry.progress == pytest.approx(0.5)


async def test_batch_lands_whole(stub, redis, settings: Settings) -> None:
    beats = [beat(f"agent-{i}") for i in range(300)]
    reply = await stub.BeatBatch(hb.BeatBatchRequest(heartbeats=beats))
    assert reply.accepted == 300
    rows = await stored(redis, Names.of(settings))
    assert sorted(a for a, _, _ in rows) == sorted(b.agent_id for b in beats)
    assert {r for _, r, _ in rows} == {reply.received_ms}


async def test_stream_replies_in_order_and_lands(stub, redis, settings: Settings) -> None:
    async def beats():
        for seq in range(1, 51):
            yield beat("agent-s", seq=seq)

    replies = [r async for r in stub.BeatStream(beats())]
    assert [r.seq for r in replies] == list(range(1, 51))
    rows = await stored(redis, Names.of(settings))
    assert len(rows) == 50 and {a for a, _, _ in rows} == {"agent-s"}


async def test_concurrent_writes_share_round_trips(ingest, redis, settings: Settings) -> None:
    """What arrives while a shard's write is in flight goes out together: here 300 RPCs' batches queue
    before the writer runs, so each shard is written once, not once per heartbeat."""
    writer = ingest.writer
    batches = []
    for i in range(300):
        batch = writer.batch(int(time.time() * 1000))
        batch.add(f"agent-{i}", "t", hb.RUNNING, int(time.time() * 1000), 0.5, None, i + 1)
        batches.append(batch)
    await asyncio.gather(*(writer.write(b) for b in batches))
    names = Names.of(settings)
    entries = sum([len(await redis.xrange(s)) for s in names.streams()])
    assert len(await stored(redis, names)) == 300
    assert entries <= names.shards


async def test_single_heartbeats_share_round_trips_with_batches(ingest, redis, settings: Settings) -> None:
    """Single heartbeats (unary Beat, stream messages) go straight into their shard's next round trip,
    alongside whole batches; a caller that went away (a cancelled call) takes nobody else's reply with it."""
    writer = ingest.writer
    now = int(time.time() * 1000)
    batch = writer.batch(now)
    for i in range(50):
        batch.add(f"batch-{i}", "t", hb.RUNNING, now, 0.5, None, 1)
    batch.add("mixed", "t", hb.RUNNING, now, 0.5, None, 1)
    # the tasks run in this order before the writer does: one round trip, the batch queued first, and the
    # same agent's single beat after it must be written after it
    whole = asyncio.create_task(writer.write(batch))
    singles = [
        asyncio.create_task(writer.write_one(f"one-{i}", "t", hb.RUNNING, now, 0.5, 0.5 if i % 2 else None, i + 1, now))
        for i in range(200)
    ]
    singles.append(asyncio.create_task(writer.write_one("mixed", "t", hb.RUNNING, now, 0.5, None, 2, now)))
    await asyncio.sleep(0)  # every caller is waiting for its round trip now
    singles[7].cancel()
    results = await asyncio.gather(*singles, whole, return_exceptions=True)
    assert isinstance(results[7], asyncio.CancelledError)
    assert all(r == {} for i, r in enumerate(results) if i != 7), results
    names = Names.of(settings)
    rows = await stored(redis, names)
    assert {a for a, _, _ in rows} >= {f"one-{i}" for i in range(200) if i != 7} | {f"batch-{i}" for i in range(50)}
    assert sum([len(await redis.xrange(s)) for s in names.streams()]) <= names.shards
    (mixed,) = [s for s in names.streams() if s == names.stream(partition_of("mixed", settings.stream_shards))]
    seqs = []
    for _, fields in await redis.xrange(mixed):
        cols = hb.HeartbeatColumns.FromString(fields[b"b"])
        seqs += [seq for agent, seq in zip(cols.agent_id, cols.seq, strict=True) if agent == "mixed"]
    assert seqs == [1, 2]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"agent_id": ""}, "agent_id"),
        ({"cpu_util": float("nan")}, "cpu_util"),
        ({"cpu_util": 3.0}, "cpu_util"),
        ({"status": 9}, "status"),
        ({"status": hb.STATUS_UNSPECIFIED}, "status"),
    ],
)
async def test_bad_heartbeat_refused_and_not_written(stub, redis, settings: Settings, changes, field) -> None:
    names = Names.of(settings)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Beat(beat("agent-x", **changes))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")

    good = [beat("agent-ok"), beat("agent-ok2"), beat("agent-bad", **changes)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.BeatBatch(hb.BeatBatchRequest(heartbeats=good))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"heartbeats[2].{field}: ")

    async def stream():
        yield beat("agent-s1")
        yield beat("agent-s2", **changes)

    call = stub.BeatStream(stream())
    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for reply in call:
            replies.append(reply)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(replies) == 1
    rows = await stored(redis, names)
    assert [a for a, _, _ in rows] == ["agent-s1"], "a refused heartbeat (or its batch) was written"
    for shard in range(names.shards):
        assert not {b"agent-x", b"agent-bad", b"agent-s2", b"agent-ok"} & set(await redis.hkeys(names.latest(shard)))


async def test_empty_batch_refused(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.BeatBatch(hb.BeatBatchRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "heartbeats" in err.value.details()


async def test_fenced_task_gets_abandon(stub, redis, settings: Settings) -> None:
    names = Names.of(settings)
    shard = partition_of("agent-f", settings.stream_shards)
    await redis.hset(names.fenced(shard), "agent-f", "agent-f-t 3")
    reply = await stub.Beat(beat("agent-f"))
    assert [(d.kind, d.task_id, d.epoch) for d in reply.directives] == [(hb.Directive.ABANDON, "agent-f-t", 3)]
    reply = await stub.Beat(beat("agent-f", task_id="another-task"))
    assert not reply.directives


async def test_health_reports_serving(ingest, settings: Settings) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    await asyncio.sleep(0.2)
    async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="heartbeat.v1.HeartbeatService")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
