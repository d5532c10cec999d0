"""The host relay against the real ingest on a real Valkey: many agents through one Unix socket, one
BeatBatch per flush upstream, each agent its own reply, directives and refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import stat
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from heartbeat_registry import AsyncHeartbeatClient, TaskAbandoned
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tokens import mint
from heartbeat_registry.core.views import RegistryEntry
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.relay import RelayServer
from heartbeat_registry.pb import hb, hb_grpc
from heartbeat_registry.relay import Relay, RelayRefused, listen
from ingest.server import Ingest
from tests import procs
from tests.kafka_helpers import eventually

SECRET = "relay-test-secret-0123456789-0123456789"


def beat(agent: str, seq: int = 1, **changes) -> hb.Heartbeat:
    now = int(time.time() * 1000)
    message = hb.Heartbeat(agent_id=agent, task_id=f"{agent}-t", status=hb.RUNNING, timestamp=now, seq=seq)
    message.cpu_util = 0.25
    for key, value in changes.items():
        setattr(message, key, value)
    return message


def relay_token(*patterns: str) -> str:
    return mint(SECRET.encode(), "relay-host7", 600, relay_for=patterns or ("host7-*",))


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # a Unix socket path must stay under ~100 bytes: pytest's tmp_path can be longer
    path = tempfile.mkdtemp(prefix="hbr-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def relay_flush() -> float:
    """How long the relay gathers beats into one batch; a test that needs many in one sets more."""
    return 0.02


@pytest.fixture
def settings(settings: Settings, socket_dir: str, relay_flush: float) -> Settings:
    """The package's settings with auth on and a relay: conftest's `ingest` serves these."""
    return dataclasses.replace(
        settings,
        auth=True,
        auth_secret=SECRET,
        relay_addr=f"unix://{socket_dir}/relay.sock",
        relay_token=relay_token(),
        relay_flush=relay_flush,
        relay_metrics_addr=f"127.0.0.1:{services.free_port()}",
    )


@pytest.fixture
async def relay_server(ingest: Ingest, settings: Settings) -> AsyncIterator[RelayServer]:
    node = RelayServer(settings)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture
async def agents(relay_server: RelayServer, settings: Settings) -> AsyncIterator[hb_grpc.HeartbeatServiceStub]:
    """What an agent of the host holds: a stub on the relay's socket, and no token."""
    async with grpc.aio.insecure_channel(settings.relay_addr) as channel:
        yield hb_grpc.HeartbeatServiceStub(channel)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def stored(client: aioredis.Redis, names: Names) -> list[tuple[str, int, int]]:
    """(agent_id, received_ms, seq) of every heartbeat in the shard streams, in each stream's order."""
    out = []
    for stream in names.streams():
        for _, fields in await client.xrange(stream):
            cols = hb.HeartbeatColumns.FromString(fields[b"b"])
            out.extend(zip(cols.agent_id, cols.received_ms, cols.seq, strict=True))
    return out


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_many_agents_each_get_their_own_reply_and_directives(
    agents: hb_grpc.HeartbeatServiceStub, redis: aioredis.Redis, settings: Settings
) -> None:
    """200 agents beat at once over their own BeatStreams to the relay's socket: the ingest sees a few
    BeatBatch requests and no stream; each agent gets its own seq back, and the fenced one alone ABANDON."""
    names = Names.of(settings)
    fenced = "host7-agent-7"
    await redis.hset(names.fenced(partition_of(fenced, settings.stream_shards)), fenced, f"{fenced}-t 3")
    by_batch = sample("hbreg_ingest_heartbeats_accepted_total", rpc="batch")
    by_stream = sample("hbreg_ingest_heartbeats_accepted_total", rpc="stream")
    batches = sample("hbreg_relay_batches_total")

    async def agent(n: int) -> tuple[str, hb.BeatReply]:
        name = f"host7-agent-{n}"
        call = agents.BeatStream()
        await call.write(beat(name, seq=1000 + n))
        reply = await call.read()
        await call.done_writing()
        return name, reply

    replies = dict(await asyncio.gather(*(agent(n) for n in range(200))))
    assert {name: r.seq for name, r in replies.items()} == {f"host7-agent-{n}": 1000 + n for n in range(200)}
    directives = {name: [(d.kind, d.agent_id, d.task_id, d.epoch) for d in r.directives] for name, r in replies.items()}
    assert directives.pop(fenced) == [(hb.Directive.ABANDON, fenced, f"{fenced}-t", 3)]
    assert all(d == [] for d in directives.values()), "a directive reached an agent it does not name"
    # acknowledged means durable: every beat is in Redis, stamped with its reply's receive time
    rows = await stored(redis, names)
    assert sorted((a, r) for a, r, _ in rows) == sorted((a, r.received_ms) for a, r in replies.items())
    assert sample("hbreg_ingest_heartbeats_accepted_total", rpc="batch") - by_batch == 200
    assert sample("hbreg_ingest_heartbeats_accepted_total", rpc="stream") == by_stream
    assert 1 <= sample("hbreg_relay_batches_total") - batches <= 20, "the relay did not batch"


# 22 concurrent calls did not all reach the relay within 20 ms on a loaded CI machine (two batches)
@pytest.mark.parametrize("relay_flush", [0.5])
async def test_a_bad_heartbeat_and_a_foreign_agent_are_refused_alone(
    agents: hb_grpc.HeartbeatServiceStub, redis: aioredis.Redis, settings: Settings
) -> None:
    """In one flush: an invalid heartbeat gets INVALID_ARGUMENT naming its field, an agent outside the
    relay token's patterns PERMISSION_DENIED, each without the batch index; the others are acknowledged."""
    batches = sample("hbreg_relay_batches_total")
    names = [f"host7-ok-{n}" for n in range(20)]
    calls = [agents.Beat(beat(n, seq=5)) for n in names]
    calls.insert(7, agents.Beat(beat("host7-bad", cpu_util=3.0)))
    calls.insert(13, agents.Beat(beat("other-host-1")))
    results = await asyncio.gather(*calls, return_exceptions=True)
    foreign, bad = results.pop(13), results.pop(7)

    assert isinstance(bad, grpc.aio.AioRpcError) and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.details().startswith("cpu_util: "), bad.details()
    assert isinstance(foreign, grpc.aio.AioRpcError) and foreign.code() == grpc.StatusCode.PERMISSION_DENIED
    assert foreign.details().startswith("agent_id: 'other-host-1' is not an agent the caller may speak for")
    assert all(isinstance(r, hb.BeatReply) and r.seq == 5 for r in results), results
    assert len({r.received_ms for r in results}) == 1, "the good beats did not travel in one batch"
    assert sample("hbreg_relay_batches_total") - batches == 1
    rows = await stored(redis, Names.of(settings))
    assert sorted(a for a, _, _ in rows) == sorted(names), "refused beats were stored, or good ones lost"


async def test_a_passed_through_batch_is_accepted_or_refused_whole(
    agents: hb_grpc.HeartbeatServiceStub, redis: aioredis.Redis, settings: Settings
) -> None:
    """A BeatBatch sent to the relay keeps the ingest's contract: all or none, the index its own."""
    good = hb.BeatBatchRequest(heartbeats=[beat("host7-b1"), beat("host7-b2")])
    bad = hb.BeatBatchRequest(heartbeats=[beat("host7-c1"), beat("host7-c2", status=hb.STATUS_UNSPECIFIED)])
    single = agents.Beat(beat("host7-single"))
    results = await asyncio.gather(agents.BeatBatch(good), agents.BeatBatch(bad), single, return_exceptions=True)
    assert isinstance(results[0], hb.BeatBatchReply) and results[0].accepted == 2
    refusal = results[1]
    assert isinstance(refusal, grpc.aio.AioRpcError) and refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.details().startswith("heartbeats[1].status: "), refusal.details()
    assert isinstance(results[2], hb.BeatReply)
    rows = await stored(redis, Names.of(settings))
    assert sorted(a for a, _, _ in rows) == ["host7-b1", "host7-b2", "host7-single"]


async def test_an_agents_beats_stay_in_order_when_a_batch_is_sent_again(
    ingest: Ingest, redis: aioredis.Redis, settings: Settings
) -> None:
    """Batches of two, four in flight: the first batch holds a bad beat, so it goes to the ingest twice.
    The agent's second beat waits for its first instead of overtaking it in another batch."""
    relay = Relay(settings.grpc_addr, token=relay_token(), flush=0.05, max_batch=2)
    async with relay:
        first = asyncio.ensure_future(relay.submit(beat("host7-bad", cpu_util=-1.0)))
        rest = [asyncio.ensure_future(relay.submit(beat("host7-a", seq=s))) for s in (1, 2, 3)]
        other = asyncio.ensure_future(relay.submit(beat("host7-z", seq=9)))
        with pytest.raises(RelayRefused) as err:
            await first
        replies = await asyncio.gather(*rest, other)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.details.startswith("cpu_util: ")
    assert [r.seq for r in replies] == [1, 2, 3, 9]
    rows = await stored(redis, Names.of(settings))
    assert [seq for agent, _, seq in rows if agent == "host7-a"] == [1, 2, 3]
    assert [agent for agent, _, _ in rows if agent == "host7-z"] == ["host7-z"]


async def test_the_client_library_beats_through_the_relay(
    relay_server: RelayServer, settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No token on the agent: `relay=` (or HBREG_RELAY) is all it takes; ABANDON still cancels its task."""
    names = Names.of(settings)

    async def latest(agent: str) -> RegistryEntry | None:
        value = await redis.hget(names.latest(partition_of(agent, settings.stream_shards)), agent)
        return RegistryEntry.decode(agent, value) if value else None

    # the control: the same agent straight to the ingest, without a token, is refused
    direct = AsyncHeartbeatClient("host7-lib", settings.grpc_addr, interval=0.05, relay="")
    async with direct:
        await eventually(lambda: direct.error is not None, 5)
    assert direct.error is not None and direct.error.code == "UNAUTHENTICATED"

    client = AsyncHeartbeatClient("host7-lib", relay=settings.relay_addr, interval=0.05)
    async with client:
        await eventually(lambda: client.beats_acknowledged >= 3, 5)
        await redis.hset(names.fenced(partition_of("host7-lib", settings.stream_shards)), "host7-lib", "job-9 4")
        with pytest.raises(TaskAbandoned) as abandoned:
            async with client.task("job-9"):
                await asyncio.sleep(5)
    assert abandoned.value.directive.epoch == 4
    entry = await latest("host7-lib")
    assert entry is not None and entry.status == hb.STOPPING  # left on purpose, through the relay

    # HBREG_RELAY wins over the endpoints given: here an address where nothing listens
    monkeypatch.setenv("HBREG_RELAY", settings.relay_addr)
    env_client = AsyncHeartbeatClient("host7-env", f"127.0.0.1:{services.free_port()}", interval=0.05)
    async with env_client:
        await eventually(lambda: env_client.beats_acknowledged >= 1, 5)
    assert env_client.endpoint == settings.relay_addr and await latest("host7-env") is not None


async def test_close_drains_what_is_queued(ingest: Ingest, redis: aioredis.Redis, settings: Settings) -> None:
    """A flush of 30 s: nothing leaves until close(), which sends the queue and answers every beat."""
    relay = Relay(settings.grpc_addr, token=relay_token(), flush=30.0)
    await relay.start()
    waiting = [asyncio.ensure_future(relay.submit(beat(f"host7-d{n}"))) for n in range(50)]
    await asyncio.sleep(0.3)
    assert not any(w.done() for w in waiting) and relay.queued == 50
    started = time.monotonic()
    await relay.close()
    assert time.monotonic() - started < 5
    replies = [w.result() for w in waiting]
    assert len({r.received_ms for r in replies}) == 1
    assert len(await stored(redis, Names.of(settings))) == 50
    with pytest.raises(RelayRefused) as err:
        await relay.submit(beat("host7-late"))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_an_ingest_that_does_not_answer_fails_over_then_times_out(ingest: Ingest, settings: Settings) -> None:
    dead = f"127.0.0.1:{services.free_port()}"
    relay = Relay([dead, settings.grpc_addr], token=relay_token(), deadline=3.0)
    async with relay:
        reply = await relay.submit(beat("host7-f"))
        assert reply.seq == 1 and relay.endpoint == settings.grpc_addr
    lonely = Relay(dead, token=relay_token(), deadline=0.5)
    async with lonely:
        started = time.monotonic()
        with pytest.raises(RelayRefused) as err:
            await lonely.submit(beat("host7-f"))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "0.5 s" in err.value.details
    assert 0.4 < time.monotonic() - started < 2.0 and lonely.upstream_ok is False


async def test_a_refused_relay_token_is_unavailable_to_the_agents(ingest: Ingest, settings: Settings) -> None:
    """Not UNAUTHENTICATED: the agents' clients would stop beating for good over the relay's fault."""
    relay = Relay(settings.grpc_addr, token="not-a-token")
    async with relay:
        with pytest.raises(RelayRefused) as err:
            await relay.submit(beat("host7-t"))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "UNAUTHENTICATED" in err.value.details
    assert relay.upstream_ok is False  # so its health says NOT_SERVING


async def test_a_rate_limited_agent_does_not_cost_the_others_their_beats(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """One token each (burst 1): the flooding agent's second beat is refused with its pushback; the
    refused attempt of the batch does not use up the quiet agent's token, so its re-sent beat passes."""
    node = Ingest(dataclasses.replace(settings, rate_limit=0.5, rate_burst=1.0))
    await node.start()
    relay = Relay(settings.grpc_addr, token=relay_token(), flush=0.05)
    try:
        async with relay:
            quiet = asyncio.ensure_future(relay.submit(beat("host7-quiet")))
            floods = [asyncio.ensure_future(relay.submit(beat("host7-flood", seq=s))) for s in (1, 2)]
            results = await asyncio.gather(quiet, *floods, return_exceptions=True)
    finally:
        await node.stop(grace=0.2)
    assert isinstance(results[0], hb.BeatReply) and isinstance(results[1], hb.BeatReply)
    limited = results[2]
    assert isinstance(limited, RelayRefused) and limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited.details.startswith("agent_id: 'host7-flood' exceeds the rate limit") and limited.retry_ms > 0


def test_the_relay_listens_only_where_no_token_is_needed() -> None:
    server = grpc.aio.server()
    for addr in ("0.0.0.0:5000", "10.1.2.3:5000", "example.com:5000"):
        with pytest.raises(ConfigError):
            listen(server, addr)
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"HBREG_RELAY_ADDR": "0.0.0.0:50052"}, use_state=False)
    assert str(err.value).startswith("HBREG_RELAY_ADDR='0.0.0.0:50052': expected unix:///PATH or a loopback")
    settings = Settings.from_env({"HBREG_RELAY": "unix:///run/r.sock", "HBREG_RELAY_ADDR": "[::1]:1"}, use_state=False)
    assert (settings.relay, settings.relay_addr) == ("unix:///run/r.sock", "[::1]:1")


async def test_hbreg_relay_serves_a_private_socket_and_drains_on_sigterm(
    ingest: Ingest, settings: Settings, redis: aioredis.Redis, socket_dir: str, tmp_path
) -> None:
    """The process: socket mode 0660, grpc health, /metrics, and SIGTERM answers the beats it holds
    (a 20 s flush: only the drain can send them) before it exits 0."""
    settings = dataclasses.replace(settings, relay_flush=20.0)
    proc = procs.hbreg(["relay"], settings, tmp_path / "relay.log")
    path = settings.relay_addr[len("unix://") :]
    try:
        await eventually(lambda: os.path.exists(path), 20)
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o660
        async with grpc.aio.insecure_channel(settings.relay_addr) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="heartbeat.v1.HeartbeatService"), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = hb_grpc.HeartbeatServiceStub(channel)
            calls = [asyncio.ensure_future(stub.Beat(beat(f"host7-p{n}"), timeout=30)) for n in range(10)]

            def queued() -> bool:
                url = f"http://{settings.relay_metrics_addr}/metrics"
                with urllib.request.urlopen(url, timeout=2) as page:
                    return "hbreg_relay_queued_heartbeats 10.0" in page.read().decode()

            await eventually(lambda: asyncio.to_thread(queued), 10)
            assert not any(c.done() for c in calls)
            proc.send_signal(signal.SIGTERM)
            replies = await asyncio.gather(*calls)
        assert all(r.seq == 1 for r in replies)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        assert not os.path.exists(path)
    finally:
        procs.stop(proc)
    assert len(await stored(redis, Names.of(settings))) == 10
    log = (tmp_path / "relay.log").read_text()
    assert "relay stopping: draining" in log and "queued=10" in log, log
