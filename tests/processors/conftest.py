from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
from collections.abc import AsyncIterator

import grpc
import pytest

from heartbeat_registry.core import health as ops_health
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.bench.common import wait_worker
from heartbeat_registry.pb import hb_grpc
from ingest.server import Ingest
from sinks.web.server import QueryServer
from tests import procs


@dataclasses.dataclass
class Pipeline:
    settings: Settings
    stub: hb_grpc.HeartbeatServiceStub
    ingest: Ingest
    bridge: subprocess.Popen
    workers: list[subprocess.Popen]
    query: QueryServer | None
    tmp_path: object
    launched: dict[int, tuple[Settings, object]] = dataclasses.field(default_factory=dict)  # pid -> (settings, log)
    restarts: int = 0

    async def add_worker(self) -> subprocess.Popen:
        """One more faust worker (the first on the settings' web port, where the dashboard's health looks;
        the others on their own); returns once it owns partitions."""
        addr = self.settings.worker_web_addr if not self.workers else f"127.0.0.1:{services.free_port()}"
        settings = dataclasses.replace(self.settings, worker_web_addr=addr)
        log = self.tmp_path / f"worker{len(self.workers)}.log"  # type: ignore[operator]
        worker = procs.hbreg(["worker"], settings, log)
        self.launched[worker.pid] = (settings, log)
        self.workers.append(worker)
        await asyncio.to_thread(wait_worker, settings.worker_web_addr, worker, 60)
        return worker

    async def supervise(self) -> None:
        """Start a worker again, under its own name, once it exits with code 1 on its own, as `hbreg up`
        and a Deployment do: a worker whose table recovery reads nothing for 10 s exits so
        (processors/recovery_watch.py). Workers a test stops are out of `workers` first, or end otherwise."""
        while True:
            await asyncio.sleep(0.2)
            for index, worker in enumerate(self.workers):
                if worker.poll() == 1:
                    settings, log = self.launched[worker.pid]
                    self.workers[index] = procs.hbreg(["worker"], settings, log)
                    self.launched[self.workers[index].pid] = (settings, log)
                    self.restarts += 1


@contextlib.asynccontextmanager
async def running_pipeline(
    settings: Settings, tmp_path, workers: int = 1, query: bool = False
) -> AsyncIterator[Pipeline]:
    """Ingest and query API in-process; bridge and faust workers as real processes."""
    ingest = Ingest(settings)
    await ingest.start()
    stop_ops = await ops_health.serve(settings.ingest_metrics_addr, lambda: bool(ingest.watch.up))
    bridge = procs.hbreg(["bridge"], settings, tmp_path / "bridge.log")
    server = None
    pipeline = None
    try:
        if query:
            server = QueryServer(settings)
            await server.start()
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            pipeline = Pipeline(settings, hb_grpc.HeartbeatServiceStub(channel), ingest, bridge, [], server, tmp_path)
            for _ in range(workers):
                await pipeline.add_worker()
            yield pipeline
    finally:
        for worker in pipeline.workers if pipeline else []:
            procs.stop(worker)
        procs.stop(bridge)
        server = pipeline.query if pipeline else server  # a test may have replaced it
        if server is not None:
            await server.stop()
        await stop_ops()
        await ingest.stop()


@pytest.fixture
async def pipeline(pipeline_settings: Settings, tmp_path) -> AsyncIterator[hb_grpc.HeartbeatServiceStub]:
    async with running_pipeline(pipeline_settings, tmp_path) as running:
        yield running.stub
