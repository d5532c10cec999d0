from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from heartbeat_registry.pb import hb_grpc
from heartbeat_registry.settings import Settings
from ingest.server import Ingest
from tests import procs


@pytest.fixture
async def pipeline(pipeline_settings: Settings, tmp_path) -> AsyncIterator[hb_grpc.HeartbeatServiceStub]:
    """Ingest in-process; bridge and one faust worker as real processes. Yields a gRPC stub."""
    settings = pipeline_settings
    ingest = Ingest(settings)
    await ingest.start()
    bridge = procs.hbreg(["bridge"], settings, tmp_path / "bridge.log")
    worker = procs.hbreg(["worker"], settings, tmp_path / "worker.log")
    try:
        await asyncio.to_thread(procs.wait_worker_ready, settings, worker)
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            yield hb_grpc.HeartbeatServiceStub(channel)
    finally:
        procs.stop(worker)
        procs.stop(bridge)
        await ingest.stop()
