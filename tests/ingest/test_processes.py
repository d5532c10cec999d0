"""`hbreg ingest` with HBREG_INGEST_PROCESSES=2: two real ingest processes on one port, on a real Valkey."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import time
import urllib.request

import grpc
import psutil
import redis.asyncio as aioredis

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb, hb_grpc
from tests import procs
from tests.kafka_helpers import eventually


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


async def health(settings: Settings) -> dict:
    status, body = await asyncio.to_thread(_get, f"http://{settings.ingest_metrics_addr}/healthz")
    return {"status": status, **(json.loads(body) if body else {})}


def served_by(children: list[psutil.Process], port: int) -> list[int]:
    """Established connections on the gRPC port, per child."""
    return [
        sum(1 for c in child.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
        for child in children
    ]


async def beat_on_new_connections(settings: Settings, agents: range) -> list[grpc.aio.Channel]:
    """One channel (one TCP connection: no shared subchannel pool) per agent, each beating once."""
    channels = []
    for n in agents:
        channel = grpc.aio.insecure_channel(settings.grpc_addr, options=[("grpc.use_local_subchannel_pool", 1)])
        beat = hb.Heartbeat(agent_id=f"a{n}", task_id="t", status=hb.RUNNING, timestamp=now_ms(), cpu_util=0.1)
        await hb_grpc.HeartbeatServiceStub(channel).Beat(beat, timeout=5)
        channels.append(channel)
    return channels


async def test_two_ingest_processes_share_the_port_and_a_killed_one_is_restarted(settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(settings, ingest_processes=2)
    port = int(settings.grpc_addr.rpartition(":")[2])
    parent = procs.hbreg(["ingest"], settings, tmp_path / "ingest.log")
    client = aioredis.Redis.from_url(settings.redis_url)
    channels: list[grpc.aio.Channel] = []
    try:
        await eventually(lambda: health(settings), timeout=30)

        async def serving() -> bool:
            return (await health(settings)).get("status") == 200

        await eventually(serving, timeout=30)
        children = psutil.Process(parent.pid).children()
        assert len(children) == 2

        channels = await beat_on_new_connections(settings, range(60))
        per_child = served_by(children, port)
        assert sum(per_child) == 60 and min(per_child) > 0, f"the kernel gave every connection to one: {per_child}"

        victim = children[0]
        victim.send_signal(signal.SIGKILL)

        async def restarted() -> bool:
            state = await health(settings)
            return state.get("restarts") == 1 and state.get("status") == 200

        await eventually(restarted, timeout=30)
        assert len(psutil.Process(parent.pid).children()) == 2
        channels += await beat_on_new_connections(settings, range(60, 80))  # served again on the port

        names = Names.of(settings)
        stored = sum([await client.hlen(names.latest(s)) for s in range(names.shards)])
        assert stored == 80  # every acknowledged heartbeat is in Redis
        _, metrics = await asyncio.to_thread(_get, f"http://{settings.ingest_metrics_addr}/metrics")
        accepted = sum(
            float(line.rpartition(" ")[2])
            for line in metrics.decode().splitlines()
            if line.startswith("hbreg_ingest_heartbeats_accepted_total{")
        )
        assert accepted == 80  # merged over the processes, the killed one's included
    finally:
        for channel in channels:
            await channel.close()
        started = time.monotonic()
        code = procs.stop(parent)
        await client.aclose()
    assert code == 0 and time.monotonic() - started < 15
    assert not [p for p in children[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
