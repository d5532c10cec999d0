"""Abuse limits against the real ingest: each refusal names its field or limit, others are unaffected."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb, hb_grpc
from ingest.server import Ingest


def beat(agent: str, **changes) -> hb.Heartbeat:
    message = hb.Heartbeat(
        agent_id=agent, task_id="t", status=hb.RUNNING, timestamp=int(time.time() * 1000), cpu_util=0.1
    )
    for key, value in changes.items():
        setattr(message, key, value)
    return message


@pytest.fixture
async def limited(settings: Settings):
    limited_settings = dataclasses.replace(
        settings, rate_limit=5.0, rate_burst=5.0, max_batch=100, max_message_bytes=64 * 1024, max_clock_skew=60.0
    )
    node = Ingest(limited_settings)
    await node.start()
    async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
        yield hb_grpc.HeartbeatServiceStub(channel)
    await node.stop(grace=0.5)


async def test_flooding_agent_is_throttled_others_proceed(limited) -> None:
    stub = limited
    results = {"ok": 0, "throttled": 0}
    details = ""

    async def flood() -> None:
        nonlocal details
        for _ in range(40):
            try:
                await stub.Beat(beat("flooder"))
                results["ok"] += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                details = exc.details()
                results["throttled"] += 1
                assert dict(exc.trailing_metadata())["grpc-retry-pushback-ms"].isdigit()

    async def polite(agent: str) -> int:
        accepted = 0
        for _ in range(3):
            await stub.Beat(beat(agent))  # raises if throttled
            accepted += 1
            await asyncio.sleep(0.25)
        return accepted

    _, *polite_counts = await asyncio.gather(flood(), *(polite(f"polite-{i}") for i in range(5)))
    assert results["ok"] <= 7 and results["throttled"] >= 33
    assert "rate limit" in details and "'flooder'" in details
    assert polite_counts == [3] * 5


async def test_batch_size_limit(limited) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limited.BeatBatch(hb.BeatBatchRequest(heartbeats=[beat(f"a{i}") for i in range(101)]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details().startswith("heartbeats: 101") and "1 to 100" in err.value.details()


async def test_message_size_limit(limited) -> None:
    big = hb.BeatBatchRequest(heartbeats=[beat(f"agent-{i}", task_id="x" * 250) for i in range(99)] * 3)
    assert big.ByteSize() > 64 * 1024
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limited.BeatBatch(big)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()


async def test_field_length_limits(limited) -> None:
    for changes, field in (({"agent_id": "a" * 129}, "agent_id"), ({"task_id": "t" * 257}, "task_id")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await limited.Beat(beat("agent-l", **changes))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}: longer than")


async def test_clock_skew_limit(limited) -> None:
    now = int(time.time() * 1000)
    await limited.Beat(beat("agent-k", timestamp=now - 30_000))  # within the limit: stored
    for offset, word in ((2 * 3600_000, "ahead of"), (-90_000, "behind")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await limited.Beat(beat("agent-k", timestamp=now + offset))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            err.value.details().startswith("timestamp: ")
            and word in err.value.details()
            and "limit" in err.value.details()
        )
