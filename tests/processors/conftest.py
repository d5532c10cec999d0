from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
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
from processors.recovery_watch import STUCK_ERROR
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
    # pid -> (settings, log, the log's length at the start): what `supervise` starts it again with
    launched: dict[int, tuple[Settings, pathlib.Path, int]] = dataclasses.field(default_factory=dict)
    restarts: int = 0

    async def add_worker(self) -> subprocess.Popen:
        """One more faust worker (the first on the settings' web port, where the dashboard's health looks;
        the others on their own); returns once it owns partitions."""
        addr = self.settings.worker_web_addr if not self.workers else f"127.0.0.1:{services.free_port()}"
        settings = dataclasses.replace(self.settings, worker_web_addr=addr)
        worker = self._launch(settings, pathlib.Path(str(self.tmp_path)) / f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        await asyncio.to_thread(wait_worker, settings.worker_web_addr, worker, 60)
        return worker

    async def supervise(self) -> None:
        """Start a worker again, under its own name, once the recovery watch stopped it (its log says so,
        processors/recovery_watch.py), as `hbreg up` and a Deployment do. Any other exit stays an exit
        for the test to see; workers a test stops are out of `workers` first."""
        while True:
            await asyncio.sleep(0.2)
            for index, worker in enumerate(self.workers):
                if worker.poll() is None:
                    continue
                launched = self.launched.pop(worker.pid, None)  # looked at once, when it has just ended
                if launched is None:
                    continue
                settings, log, start = launched
                if STUCK_ERROR.encode() in log.read_bytes()[start:]:
                    self.workers[index] = self._launch(settings, log)
                    self.restarts += 1

    def _launch(self, settings: Settings, log: pathlib.Path) -> subprocess.Popen:
        start = log.stat().st_size if log.exists() else 0
        worker = procs.hbreg(["worker"], settings, log)
        self.launched[worker.pid] = (settings, log, start)
        return worker


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
