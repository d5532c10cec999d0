"""`hbreg ingest` with HBREG_INGEST_PROCESSES > 1: several ingest processes on one port.

One Python process meets grpcio's per-message cost on one core, so a host with more cores runs one
ingest per core. They share the gRPC port through SO_REUSEPORT (grpc core sets it on Linux, and the
kernel spreads new connections over the listeners), so agents need no extra endpoints. This parent
only starts them, restarts one that dies (its agents reconnect to the others meanwhile: the client
fails over) and serves the ops endpoint for all of them: `/metrics` through prometheus_client's
multiprocess mode (each child writes its metrics to files in one directory, the parent merges them),
`/healthz` 200 while every child runs and reaches Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from heartbeat_registry.core import health as ops_health
from heartbeat_registry.core.lifecycle import die_with_parent, stop_signal
from heartbeat_registry.core.settings import Settings

log = logging.getLogger(__name__)
RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 20.0


class Children:
    """The ingest processes: started, restarted when they die, stopped with SIGTERM (they drain)."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self.count = count
        self.env = env
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self.restarts = 0

    async def start(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "heartbeat_registry",
            "ingest",
            "--no-ops",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        self.procs[index] = proc
        log.info("ingest process started", extra={"index": index, "pid": proc.pid})

    def running(self) -> int:
        return sum(1 for p in self.procs if p is not None and p.returncode is None)

    async def keep(self, stop: asyncio.Event) -> None:
        """Restart any child that exits until `stop`."""
        from prometheus_client import multiprocess

        while not stop.is_set():
            waits = {asyncio.create_task(p.wait()): i for i, p in enumerate(self.procs) if p is not None}
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({stopping, *waits}, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            stopping.cancel()
            if stop.is_set():
                return
            for task in done:
                index = waits.get(task)
                if index is None:
                    continue
                proc = self.procs[index]
                assert proc is not None
                log.warning(
                    "ingest process exited; restarting it",
                    extra={"index": index, "pid": proc.pid, "code": proc.returncode},
                )
                multiprocess.mark_process_dead(proc.pid)
                self.restarts += 1
                await asyncio.sleep(RESTART_DELAY_S)
                if not stop.is_set():
                    await self.start(index)

    async def stop(self) -> None:
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), STOP_TIMEOUT_S)
        except TimeoutError:
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in live))


def _merged_metrics() -> Any:
    """The children's metrics, read from their files at every collection."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def _redis_up(registry: Any) -> bool:
    """Every live child reaches Redis: hbreg_ingest_redis_up merged with `livemin`."""
    for family in registry.collect():
        if family.name == "hbreg_ingest_redis_up":
            return bool(family.samples) and all(s.value == 1 for s in family.samples)
    return False


async def serve(settings: Settings) -> None:
    stop = stop_signal()
    metrics_dir = tempfile.mkdtemp(prefix="hbreg-ingest-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # for the children, and the collector here
    children = Children(settings.ingest_processes, {**os.environ, "HBREG_INGEST_PROCESSES": "1"})
    for index in range(children.count):
        await children.start(index)
    merged = _merged_metrics()
    cleanup = await ops_health.serve(
        settings.ingest_metrics_addr,
        lambda: children.running() == children.count and _redis_up(merged),
        registry=merged,
        details=lambda: {"processes": children.count, "running": children.running(), "restarts": children.restarts},
    )
    log.info(
        "ingest processes running",
        extra={"processes": children.count, "grpc_addr": settings.grpc_addr, "ops_addr": settings.ingest_metrics_addr},
    )
    started = time.monotonic()
    try:
        await children.keep(stop)
    finally:
        log.info("ingest processes stopping", extra={"uptime_s": round(time.monotonic() - started, 1)})
        await children.stop()
        await cleanup()
        shutil.rmtree(metrics_dir, ignore_errors=True)
