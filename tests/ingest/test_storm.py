"""A reconnect storm: new BeatStreams beyond HBREG_STREAM_OPEN_RATE are refused with RESOURCE_EXHAUSTED and
a `grpc-retry-pushback-ms` that hands out later slots in turn, while admitted streams are served; the
client library waits the pushback (plus its jitter) and gets through."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import random
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from heartbeat_registry import AsyncHeartbeatClient
from heartbeat_registry.client import retry_delay
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb, hb_grpc
from ingest.limits import StreamAdmission
from ingest.server import Ingest
from tests.ingest.test_server import beat, stored


def test_admission_spreads_a_crowd_over_later_slots() -> None:
    admission = StreamAdmission(rate=100.0, burst=3.0)
    assert [admission.admit(10.0) for _ in range(3)] == [0, 0, 0]  # the burst
    refused = [admission.admit(10.0) for _ in range(5)]
    # the first refused stream is told the next free slot, each further one an interval (10 ms) later
    assert [round(ms, -1) for ms in refused] == [10, 20, 30, 40, 50]
    assert admission.admit(10.011) == 0  # the first promised slot is free when it comes back
    # a quiet second later the pace is back and nothing is promised any more
    assert [admission.admit(11.0) for _ in range(3)] == [0, 0, 0]


def test_client_honours_a_pushback_with_jitter_and_never_returns_early() -> None:
    rng = random.Random(7)
    delays = [retry_delay(2.0, 0.2, rng) for _ in range(1000)]
    assert min(delays) >= 2.0 and max(delays) <= 2.5
    assert max(delays) - min(delays) > 0.4  # spread, not in lockstep
    assert all(0.1 <= retry_delay(0.0, 0.2, rng) <= 0.3 for _ in range(100))  # no pushback: backoff


Opener = Callable[[str], Awaitable[tuple[grpc.aio.StreamStreamCall, object]]]


@contextlib.asynccontextmanager
async def _paced_ingest(settings: Settings, rate: float) -> AsyncIterator[tuple[Ingest, Opener]]:
    """An ingest taking on `rate` new streams a second, and `open(agent)`: a new stream to it and the
    answer to its first heartbeat (the reply, or the AioRpcError). Every stream opened is cancelled and
    the ingest stopped on the way out."""
    ingest = Ingest(dataclasses.replace(settings, stream_open_rate=rate))
    await ingest.start()
    calls: list[grpc.aio.StreamStreamCall] = []
    try:
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)

            async def open_stream(agent: str) -> tuple[grpc.aio.StreamStreamCall, object]:
                call = stub.BeatStream()
                calls.append(call)
                await call.write(beat(agent))
                try:
                    return call, await call.read()
                except grpc.aio.AioRpcError as exc:
                    return call, exc

            yield ingest, open_stream
    finally:
        for call in calls:
            call.cancel()
        await ingest.stop(grace=0.5)


async def test_streams_beyond_the_pace_are_refused_with_a_pushback(settings: Settings, redis) -> None:
    async with _paced_ingest(settings, 2.0) as (_, open_stream):  # a burst of 2, then one per 0.5 s
        calls, answers = [], []
        for n in range(5):
            call, answer = await open_stream(f"storm-{n}")
            calls.append(call)
            answers.append(answer)
        replies = [a for a in answers if isinstance(a, hb.BeatReply)]
        refusals = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert len(replies) == 2 and len(refusals) == 3  # positive control: the burst is served
        assert {r.seq for r in replies} == {1}
        pushbacks = []
        for exc in refusals:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "ingest busy" in (exc.details() or "")
            pushbacks.append(int(dict(exc.trailing_metadata() or ())["grpc-retry-pushback-ms"]))
        # one interval (500 ms) apart: the crowd is sent back spread, not all to the same moment
        assert pushbacks == sorted(pushbacks) and pushbacks[-1] - pushbacks[0] >= 900
        # the admitted streams go on beating while new ones are refused
        admitted = calls[answers.index(replies[0])]
        await admitted.write(beat("storm-0", seq=2))
        assert (await admitted.read()).seq == 2
        rows = await stored(redis, Names.of(settings))
        assert sorted(a for a, _, _ in rows) == ["storm-0", "storm-0", "storm-1"]  # refused: not stored


async def test_streams_refused_while_redis_is_down_take_no_admission_slot(settings: Settings) -> None:
    """While its Redis is down, an ingest refuses new streams with UNAVAILABLE before admission: the
    crowd retrying through the outage must not use up the slots, or be promised slots far past it."""
    async with _paced_ingest(settings, 2.0) as (ingest, open_stream):  # a burst of 2, then one per 0.5 s
        ingest.watch.writer = types.SimpleNamespace()  # the watch would find Redis reachable again
        ingest.writer.available = False  # as after a failed write
        for n in range(10):
            _, answer = await open_stream(f"outage-{n}")
            assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() == grpc.StatusCode.UNAVAILABLE
            assert int(dict(answer.trailing_metadata() or ())["grpc-retry-pushback-ms"]) <= 1000
        ingest.writer.available = True  # Redis is back: the burst is all there
        for n in range(2):
            _, answer = await open_stream(f"back-{n}")
            assert isinstance(answer, hb.BeatReply), answer
        _, answer = await open_stream("over")  # positive control: the pace still applies
        assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_client_waits_out_the_pushback_and_gets_through(settings: Settings) -> None:
    async with _paced_ingest(settings, 0.5) as (_, open_stream):  # one new stream every 2 s
        _, answer = await open_stream("holder")  # takes this second's slot
        assert isinstance(answer, hb.BeatReply)
        _, answer = await open_stream("crowd")  # refused: promised the next slot, 2 s away
        assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        started = time.monotonic()
        client = AsyncHeartbeatClient("latecomer", settings.grpc_addr, interval=0.1, sample_cpu=False)
        await client.start()
        try:
            deadline = started + 15.0
            while client.beats_acknowledged == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            waited = time.monotonic() - started
        finally:
            await client.stop()
        assert client.beats_acknowledged >= 1 and client.error is None
        # refused first and promised the slot after the crowd's, 4 s away: it waited for it (its own
        # backoff alone would have brought it back as soon as the 2 s slot was free)
        assert waited >= 3.8, f"through after {waited:.2f} s: the pushback was not honoured"


def test_a_restart_sized_crowd_is_back_within_the_promised_time() -> None:
    """20,000 agents in 2 s against the default pace, each retrying by the client's rule: every one is
    admitted, in about 20,000 / rate seconds (pure logic: what the pushbacks promise)."""
    rate = Settings().stream_open_rate
    rng = random.Random(1)
    admission = StreamAdmission(rate, rate)
    pending = [(rng.uniform(0, 2.0), n) for n in range(20_000)]
    heapq.heapify(pending)
    back: dict[int, float] = {}
    refusals = 0
    while pending:
        now, n = heapq.heappop(pending)
        wait_ms = admission.admit(now)
        if wait_ms:
            refusals += 1
            heapq.heappush(pending, (now + retry_delay(wait_ms / 1000, 0.2, rng), n))
        else:
            back[n] = now
    assert len(back) == 20_000
    assert max(back.values()) < 1.3 * 20_000 / rate
    assert refusals < 20_000  # most are refused once: their slot is free when they come back
