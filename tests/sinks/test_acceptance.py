"""Recovery under `hbreg up` with the reference assigner: 200 agents, 150 tasks, 30 owners killed at random
moments. Every task runs again within the stall timeout + 2 s of its owner's death, none is lost, and at
no moment do two agents beat RUNNING on one task both unfenced (checked from every stored heartbeat)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import redis.asyncio as aioredis

from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tokens import mint
from heartbeat_registry.hbreg.chaos.verdict import two_unfenced_owners
from heartbeat_registry.hbreg.simulate import Fleet
from heartbeat_registry.pb import hb
from tests.core.test_up import up_env_on

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
TIMEOUT_S = 2.0


def get(addr: str, path: str) -> dict:
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as response:
        return dict(json.load(response))


async def running_beats(settings: Settings) -> dict[str, list[tuple[int, str]]]:
    """task -> (receive time, agent) of every stored heartbeat RUNNING on it, in time order."""
    client = aioredis.Redis.from_url(settings.redis_url)
    out: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    try:
        for stream in Names.of(settings).streams():
            for _, fields in await client.xrange(stream):
                cols = hb.HeartbeatColumns.FromString(fields[b"b"])
                for agent, task, status, at in zip(
                    cols.agent_id, cols.task_id, cols.status, cols.received_ms, strict=True
                ):
                    if task and status == hb.RUNNING:
                        out[task].append((at, agent))
    finally:
        await client.aclose()
    return {task: sorted(beats) for task, beats in out.items()}


async def test_every_task_of_killed_agents_runs_again_under_hbreg_up(
    tmp_path, valkey_url: str, kafka_bootstrap: str
) -> None:
    prefix = "acc" + os.urandom(4).hex()
    env = up_env_on(
        tmp_path,
        valkey_url,
        kafka_bootstrap,
        prefix,
        HBREG_STALL_TIMEOUT=str(TIMEOUT_S),
        HBREG_TOPIC_PARTITIONS="4",
        HBREG_STREAM_SHARDS="4",
        HBREG_ASSIGN_TIMEOUT="10",
    )
    state_file = tmp_path / "state" / "state.json"
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed after the process ends
    up = subprocess.Popen(
        [sys.executable, "-m", "heartbeat_registry", "up"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    fleet = None
    try:
        started = time.monotonic()
        while not state_file.exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() - started < 90, "hbreg up took more than 90 s"
            await asyncio.sleep(0.2)
        recorded = json.loads(state_file.read_text())
        secret = pathlib.Path(recorded["auth_secret_file"]).read_bytes().strip()
        settings = Settings.from_env(env, use_state=False)
        agents = [f"a{i:03d}" for i in range(200)]
        tasks = {a: (f"task-{i:03d}" if i < 150 else "") for i, a in enumerate(agents)}
        fleet = Fleet(
            recorded["grpc_addr"],
            agents,
            interval=0.2,
            jitter=0.2,
            seed=3,
            token_for=lambda a: mint(secret, a, 3600),
            task_of=tasks.__getitem__,
        )
        await fleet.start()
        await asyncio.sleep(4)  # every agent has a beat history
        rng = random.Random(11)
        victims = rng.sample(agents[:150], 30)
        died: dict[str, float] = {}
        for victim in victims:  # at random moments
            await asyncio.sleep(rng.uniform(0.0, 0.4))
            await fleet.kill(victim)
            died[tasks[victim]] = time.time()
        await asyncio.sleep(TIMEOUT_S + 1)
        for victim in victims[:10]:  # some come back, still reporting their task: they must be fenced
            await fleet.revive(victim)

        def taken_over() -> dict[str, dict]:
            return {t: get(recorded["http_addr"], f"/api/tasks/{t}") for t in died}

        deadline = time.monotonic() + 30
        while True:
            state = await asyncio.to_thread(taken_over)
            if all(s["state"] == "running" and s["epoch"] >= 1 for s in state.values()):
                break
            assert time.monotonic() < deadline, {t: (s["state"], s["owner"]) for t, s in state.items()}
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # the revived ones beat on (fenced) meanwhile
        assert not fleet.errors
        late = {}
        for task, record in state.items():
            took_over = next(c["at_ms"] for c in record["history"] if c["what"] == "running" and c["epoch"] >= 1)
            if took_over / 1000 - died[task] > TIMEOUT_S + 2:
                late[task] = round(took_over / 1000 - died[task], 2)
        assert not late, f"running again later than the timeout + 2 s after the owner died: {late}"
        owners = {t: s["owner"] for t, s in state.items()}
        assert not set(owners.values()) & set(victims), "a task went back to a dead or fenced agent"
        listed = await asyncio.to_thread(get, recorded["http_addr"], "/api/tasks?state=running")
        running = {t["task_id"] for t in listed["tasks"]}
        assert running >= set(tasks.values()) - {""}, f"lost: {sorted(set(tasks.values()) - {''} - running)}"
        beats = await running_beats(settings)
        overlaps = {}
        for task in died:
            history = (await asyncio.to_thread(get, recorded["http_addr"], f"/api/tasks/{task}"))["history"]
            if found := two_unfenced_owners(beats[task], history):
                overlaps[task] = found
        assert not overlaps, overlaps
        revived_fenced = [a for a in victims[:10] if fleet.agents[a].task_id == ""]
        assert revived_fenced == victims[:10], "a revived agent kept working on its reassigned task"
    finally:
        if fleet is not None:
            await fleet.stop()
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
