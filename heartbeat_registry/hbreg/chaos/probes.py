"""When a stage works again after a fault: measured from the moment the faulty component is back (the
process restarted, the proxy healed) until

- the pipeline: every partition's clock, as the workers publish it for the query API, has passed that
  moment (so the ingest stored, the bridge forwarded, Kafka delivered and a worker folded in everything
  received until then); every fault waits for this;
- an ingest replica hit by the fault: it acknowledges a heartbeat received after that moment;
- a sink, the query API or the assigner hit by the fault: it answers its health check.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.views import PartitionClock
from heartbeat_registry.hbreg.chaos.faults import Fault
from heartbeat_registry.hbreg.chaos.system import System
from heartbeat_registry.pb import hb, hb_grpc

PROBE_AGENT = "chaos-probe"  # leaves with every beat (STOPPING), so its silence between probes is no stall
GIVE_UP_S = 120.0
EVERY_S = 0.1


class Probes:
    def __init__(self, system: System) -> None:
        self.system = system
        self.settings = system.settings
        self.names = Names.of(self.settings)
        self.redis = redis_client.connect(self.settings, socket_timeout=1.0)
        self.channels = {addr: grpc.aio.insecure_channel(addr) for addr in system.ingest_addrs}

    async def clock_passed(self, since_ms: int) -> bool:
        try:
            raw = await self.redis.hgetall(self.names.query_clock)
        except Exception:  # Valkey restarting: not yet
            return False
        marks = [PartitionClock.decode(v).watermark for v in raw.values()]
        return len(marks) >= self.settings.topic_partitions and min(marks) >= since_ms

    async def ingest_answers(self, addr: str, since_ms: int) -> bool:
        stub = hb_grpc.HeartbeatServiceStub(self.channels[addr])
        beat = hb.Heartbeat(agent_id=PROBE_AGENT, status=hb.STOPPING, timestamp=now_ms())
        try:
            reply = await stub.Beat(beat, timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return reply.received_ms >= since_ms

    def _ingests(self, fault: Fault) -> list[str]:
        if fault.kind == "valkey_restart":
            return list(self.system.ingest_addrs)
        name = fault.target.partition("-")[0]  # `ingest.2` or `ingest.2-redis`
        if name.startswith("ingest."):
            return [self.system.ingest_addrs[int(name.partition(".")[2]) - 1]]
        return []

    async def recovery(self, fault: Fault) -> float | None:
        """Seconds from `fault.end_ms` until the stages it hit work again; None after GIVE_UP_S."""
        since = fault.end_ms
        ingests = self._ingests(fault)
        process = fault.target if fault.target in self.system.procs else None
        needs_health = process is not None and self.system.procs[process].kind in (
            "reassign",
            "alerter",
            "query",
            "assigner",
        )
        deadline = time.monotonic() + GIVE_UP_S
        while time.monotonic() < deadline:
            done = await self.clock_passed(since)
            for addr in ingests:
                done = done and await self.ingest_answers(addr, since)
            if done and needs_health:
                assert process is not None
                done = await self.system.healthy(process)
            if done:
                return max(0.0, (now_ms() - since) / 1000)
            await asyncio.sleep(EVERY_S)
        return None

    async def close(self) -> None:
        await self.redis.aclose()
        for channel in self.channels.values():
            await channel.close()
