"""Crash semantics of the faust worker: kill -9 and restart keeps every window count exact; SIGTERM
stops it promptly although it holds unacknowledged records."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import signal
import time
import urllib.request

import pytest

from heartbeat_registry import embedded
from heartbeat_registry.settings import Settings
from tests import procs
from heartbeat_registry.bench.fleet import Fleet
from tests.processors.conftest import running_pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def windows_of(settings: Settings, agent: str) -> dict[int, dict]:
    url = f"http://{settings.http_addr}/api/windows?agent={agent}&from=0"
    with urllib.request.urlopen(url, timeout=10) as response:
        return {r["window_start_ms"]: r for r in json.load(response)["windows"]}


async def test_kill_and_restart_keeps_window_counts_exact(pipeline_settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(pipeline_settings, window_size=2.0, stall_timeout=5.0,
                                   http_addr=f"127.0.0.1:{embedded.free_port()}")
    async with running_pipeline(settings, tmp_path, query=True) as pipeline:
        agents = [f"c{i:02d}" for i in range(40)]
        fleet = Fleet(pipeline.stub, agents, interval=0.1, jitter=0.3)
        runner = asyncio.create_task(fleet.run())
        await asyncio.sleep(5.3)
        procs.stop(pipeline.workers[0], signal.SIGKILL)  # open windows, unacknowledged records
        await asyncio.sleep(1.0)
        await pipeline.add_worker()
        await asyncio.sleep(4.0)
        fleet.stop.set()
        await runner
        sent: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for agent, received in fleet.received:
            sent[agent][received - received % 2000] += 1
        last_closed = max(received for _, received in fleet.received) // 2000 * 2000 - 2000
        deadline = time.monotonic() + 20
        while True:
            rows = {a: await asyncio.to_thread(windows_of, settings, a) for a in agents}
            if all(r.get(last_closed, {}).get("final") for r in rows.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert not fleet.errors
    wrong = [
        (agent, start, rows[agent].get(start, {}).get("beats"), count, rows[agent].get(start, {}).get("final"))
        for agent in agents for start, count in sorted(sent[agent].items())
        if start <= last_closed and rows[agent].get(start, {}).get("beats") != count
    ]
    assert not wrong, f"{len(wrong)} windows miscounted (agent, start, counted, sent, final): {wrong[:10]}"


async def test_sigterm_stops_the_worker_promptly(pipeline_settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(pipeline_settings, window_size=30.0)  # records stay unacknowledged
    async with running_pipeline(settings, tmp_path) as pipeline:
        fleet = Fleet(pipeline.stub, [f"t{i}" for i in range(20)], interval=0.1)
        runner = asyncio.create_task(fleet.run())
        await asyncio.sleep(3)
        started = time.monotonic()
        code = procs.stop(pipeline.workers[0], signal.SIGTERM, timeout=30)
        took = time.monotonic() - started
        fleet.stop.set()
        await runner
    assert code == 0 and took < 10, f"worker took {took:.1f} s to stop (exit {code})"
