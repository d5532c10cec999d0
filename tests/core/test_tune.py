"""`hbreg tune` on a fleet recorded through the real pipeline (ingest, bridge, Kafka, a faust worker):
agents killed for good, and agents pausing longer than the stall timeout but carrying on after."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import pytest

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg.simulate import Fleet
from tests.processors.conftest import running_pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
PAUSE_S = 2.9  # against a 2 s stall timeout


def hbreg_tune(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.child_env()}
    return subprocess.run(
        [sys.executable, "-m", "heartbeat_registry", "tune", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


async def test_replay_labels_kills_true_and_long_pauses_false(pipeline_settings: Settings, tmp_path) -> None:
    settings = pipeline_settings
    agents = [f"tn-{i:03d}" for i in range(100)]
    killed, paused = agents[:20], agents[20:40]
    started = now_ms()
    async with running_pipeline(settings, tmp_path):
        fleet = Fleet(settings.grpc_addr, agents, interval=0.5, jitter=0.1, seed=5)
        try:
            await fleet.start()
            await asyncio.sleep(6)  # every agent has a beat history
            for agent in killed:  # one after another: never a mass silence
                await fleet.kill(agent)
                await asyncio.sleep(0.3)
            await asyncio.sleep(3)
            for agent in paused:  # silent 2.9 s, then beating on in the same process (its seq goes on)
                fleet.pause(agent, PAUSE_S)
                await asyncio.sleep(0.3)
            await asyncio.sleep(PAUSE_S + 4)  # the last pause ends, and the worker judged it all
        finally:
            await fleet.stop()
        ended = now_ms()
        await asyncio.sleep(1)
        report = tmp_path / "tune.html"
        done = hbreg_tune(
            settings,
            f"--from={started}",
            f"--to={ended}",
            "--grid",
            "stall_timeout=2s,4s",
            "--json",
            f"--report={report}",
        )
        from_redis = hbreg_tune(settings, f"--from={started}", f"--to={ended}", "--source=redis", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert from_redis.returncode == 0, from_redis.stderr[-3000:]
    redis_live = json.loads(from_redis.stdout)["live"]  # the streams: the same labels, on a rebuilt clock
    assert {(s["agent_id"], s["label"]) for s in redis_live["stall_list"]} == {(a, "true") for a in killed} | {
        (a, "false") for a in paused
    }
    result = json.loads(done.stdout)
    live = result["live"]
    assert live["matches_live_events"], live["differences"]
    assert live["live_events"] == live["stalls"] == 40
    labels = {s["agent_id"]: s["label"] for s in live["stall_list"]}
    assert {a for a, label in labels.items() if label == "true"} == set(killed)
    assert {a for a, label in labels.items() if label == "false"} == set(paused)
    assert live["true_stalls"] == 20 and live["false_stalls"] == 20 and live["unresolved"] == 20
    assert result["agents"] == 100 and result["heartbeats"] > 100 * 10
    assert len(result["results"]) == 2  # the grid's 2 s is the live setting: one row
    by_timeout = {r["params"]["stall_timeout"]: r for r in result["results"]}
    assert by_timeout[2.0]["live"] and by_timeout[2.0]["false_stalls"] == 20 and by_timeout[2.0]["true_stalls"] == 20
    longer = by_timeout[4.0]
    assert longer["false_stalls"] == 0 and longer["true_stalls"] == 20  # the pauses are no longer stalls
    assert longer["delay_p50_ms"] > by_timeout[2.0]["delay_p50_ms"] + 1500  # at the price of a later notice
    assert result["results"][0]["params"] == {"stall_timeout": 4.0}  # fewest false stalls first
    page = report.read_text()
    assert "Detection tuning" in page and "uPlot" in page
    assert re.search(r"(src|href)=[\"']?(https?:)?//", page) is None  # self-contained: nothing to fetch


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("phi=6,8", "unknown parameter 'phi'"),
        ("stall_timeout=5x", "--grid stall_timeout='5x': expected a number of seconds"),
        ("stall_timeout=", "--grid stall_timeout: no values"),
        ("stall_timeout", "expected NAME=VALUE"),
    ],
)
def test_a_malformed_grid_gets_one_line(settings: Settings, grid: str, message: str) -> None:
    started = time.monotonic()
    done = hbreg_tune(settings, "--grid", grid)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert time.monotonic() - started < 30
