"""The query API over the real pipeline: window rows match what was sent, exactly."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
import urllib.error
import urllib.request

import pytest

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb
from tests.conftest import BOTH_REDIS
from tests.processors.conftest import running_pipeline

pytestmark = [pytest.mark.kafka, BOTH_REDIS]


def get(settings: Settings, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{settings.http_addr}{path}", timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def poll(settings: Settings, path: str, ready, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = await asyncio.to_thread(get, settings, path)
        if status == 200 and ready(body):
            return body
        assert time.monotonic() < deadline, f"{path}: {status} {body}"
        await asyncio.sleep(0.2)


def beat(agent: str, cpu: float, status: int = hb.RUNNING) -> hb.Heartbeat:
    return hb.Heartbeat(
        agent_id=agent, task_id=f"{agent}-t", status=status, timestamp=int(time.time() * 1000), cpu_util=cpu
    )


async def test_window_rows_match_the_heartbeats_sent(pipeline_settings: Settings, tmp_path) -> None:
    from heartbeat_registry.hbreg import services

    settings = dataclasses.replace(
        pipeline_settings, window_size=2.0, stall_timeout=3.0, http_addr=f"127.0.0.1:{services.free_port()}"
    )
    async with running_pipeline(settings, tmp_path, query=True) as pipeline:
        sent: dict[int, list[float]] = collections.defaultdict(list)
        for n in range(23):
            cpu = (n % 5) / 10
            reply = await pipeline.stub.Beat(beat("q-1", cpu))
            sent[reply.received_ms - reply.received_ms % 2000].append(cpu)
            await asyncio.sleep(0.13)
        reply = await pipeline.stub.Beat(beat("q-1", 0.0, hb.STOPPING))  # leaves: no stall while we read
        sent[reply.received_ms - reply.received_ms % 2000].append(0.0)
        last_start = max(sent)
        body = await poll(
            settings,
            f"/api/windows?agent=q-1&from=0&to={int(time.time() * 1000)}",
            lambda b: any(r["window_start_ms"] == last_start and r["final"] for r in b["windows"]),
        )
        rows = {r["window_start_ms"]: r for r in body["windows"] if r["window_start_ms"] in sent}
        assert set(rows) == set(sent)
        for start, cpus in sent.items():
            row = rows[start]
            assert row["beats"] == len(cpus), (start, row)
            assert row["window_end_ms"] == start + 2000
            assert row["cpu_min"] == pytest.approx(min(cpus), abs=1e-3)
            assert row["cpu_max"] == pytest.approx(max(cpus), abs=1e-3)
            assert row["cpu_mean"] == pytest.approx(sum(cpus) / len(cpus), abs=1e-3)
            assert {"longest_gap_ms", "cpu_p95", "cpu_slope_per_min", "agent_id"} <= set(row)
        # hopping: 4 s windows hopping by 2 s, merged from the tumbling ones
        status, hop = await asyncio.to_thread(get, settings, "/api/windows?agent=q-1&from=0&size=4s")
        assert status == 200
        # one hopping window ends at every tumbling end from the first window sent to the last one
        ends = {r["window_end_ms"] for r in hop["windows"]}
        assert ends >= {start + 2000 for start in sent}, (sorted(ends), sorted(sent))
        for row in hop["windows"]:
            expected = sum(len(sent.get(s, [])) for s in (row["window_start_ms"], row["window_start_ms"] + 2000))
            assert row["beats"] == expected
            assert row["window_end_ms"] - row["window_start_ms"] == 4000

        agents = await poll(settings, "/api/agents", lambda b: any(a["agent_id"] == "q-1" for a in b["agents"]))
        agent = next(a for a in agents["agents"] if a["agent_id"] == "q-1")
        assert {"agent_id", "task_id", "status", "state", "last_seen_ms", "cpu_util", "phi"} <= set(agent)
        assert agent["state"] in ("left", "alive") and agent["status"] in ("STOPPING", "RUNNING")
        status, one = await asyncio.to_thread(get, settings, "/api/agents/q-1")
        assert status == 200 and one["agent_id"] == "q-1" and one["windows"]

        # errors name the parameter
        for path, word in (
            ("/api/agents?state=sleepy", "state"),
            ("/api/windows?agent=q-1&from=abc", "from"),
            ("/api/windows?agent=q-1&size=3s", "size"),
            ("/api/windows", "agent"),
            ("/api/events?type=nap", "type"),
            ("/api/events?since=-5", "since"),
            ("/api/events?since=soon", "since"),
            ("/api/events?limit=x", "limit"),
        ):
            status, err = await asyncio.to_thread(get, settings, path)
            assert status == 400 and err["error"].startswith(f"{word}:"), (path, err)
        status, err = await asyncio.to_thread(get, settings, "/api/events?limit=x")
        assert "whole number" in err["error"], err
        # times also as a duration ago, as the CLI takes them
        status, recent = await asyncio.to_thread(get, settings, "/api/windows?agent=q-1&from=10m")
        assert status == 200 and {r["window_start_ms"] for r in recent["windows"]} >= set(sent)
        # unknown routes answer in the same JSON shape
        status, err = await asyncio.to_thread(get, settings, "/api/nothing-here")
        assert status == 404 and err["error"] == "no such route: GET /api/nothing-here"
        for path in ("/api/agents/nobody", "/api/windows?agent=nobody"):
            status, err = await asyncio.to_thread(get, settings, path)
            assert status == 404 and "nobody" in err["error"]
        status, health = await asyncio.to_thread(get, settings, "/healthz")
        assert status == 200


async def test_stalled_agents_and_events_through_the_api(pipeline_settings: Settings, tmp_path) -> None:
    """A fast-beating agent that falls silent is stalled by phi (a small acceptable pause puts its phi
    deadline well before the 2 s timeout); the API shows it stalled with phi past the threshold."""
    from heartbeat_registry.hbreg import services

    settings = dataclasses.replace(
        pipeline_settings, stall_timeout=2.0, acceptable_pause=0.2, http_addr=f"127.0.0.1:{services.free_port()}"
    )
    async with running_pipeline(settings, tmp_path, query=True) as pipeline:
        for _ in range(8):
            await pipeline.stub.Beat(beat("s-1", 0.4))
            await asyncio.sleep(0.1)
        body = await poll(settings, "/api/agents?state=stalled", lambda b: bool(b["agents"]))
        assert [a["agent_id"] for a in body["agents"]] == ["s-1"]
        assert body["agents"][0]["reason"] == "silent"
        assert body["agents"][0]["phi"] >= settings.phi_threshold, body["agents"][0]
        events = await poll(settings, "/api/events?type=stall&since=1m", lambda b: bool(b["events"]))
        event = events["events"][0]
        assert {"type", "agent_id", "task_id", "reason", "last_seen_ms", "detected_at_ms"} <= set(event)
        assert event["type"] == "stall" and event["agent_id"] == "s-1"
