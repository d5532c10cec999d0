"""The Alertmanager sink against the real Alertmanager binary (Debian's prometheus-alertmanager): alerts
fire within 2 s, stay active while the problem lasts, resolve by themselves, reach every HA member, and
survive restarts of the sink and of Alertmanager."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services
from heartbeat_registry.pb import hb
from sinks.web.server import QueryServer
from tests import procs
from tests.conftest import require_binary
from tests.kafka_helpers import eventually
from tests.sinks.conftest import send_events, stall, start_sink, topics

pytestmark = pytest.mark.kafka

CONFIG = """
global:
  resolve_timeout: {resolve_timeout}
route:
  group_by: ["alertname", "cluster"]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
  receiver: hbreg-webhook
receivers:
  - name: hbreg-webhook
    webhook_configs:
      - url: http://{http_addr}/api/alertmanager/webhook
        send_resolved: true
inhibit_rules:
  - source_matchers: ['alertname = "AgentsMassSilence"']
    target_matchers: ['alertname = "AgentStalled"']
    equal: ["partition", "cluster"]
"""


class Alertmanager:
    """A real Alertmanager on a free port; `stop()` and `start(fresh=True)` restart it with empty storage."""

    def __init__(self, directory: pathlib.Path, http_addr: str, resolve_timeout: str = "5m") -> None:
        self.port = services.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        (directory / "alertmanager.yml").write_text(CONFIG.format(resolve_timeout=resolve_timeout, http_addr=http_addr))
        self.proc: subprocess.Popen | None = None

    def start(self, fresh: bool = False) -> None:
        storage = self.directory / ("data-fresh" if fresh else "data")
        binary = services.alertmanager_binary()
        assert binary is not None
        log = open(self.directory / "alertmanager.log", "ab")  # noqa: SIM115 - the process writes it
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.directory / 'alertmanager.yml'}",
                f"--storage.path={storage}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        services.wait_port("127.0.0.1", self.port, 30, "alertmanager")

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)

    def alerts(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:
            return list(json.load(response))

    def active(self, alertname: str, **labels: str) -> list[dict]:
        return [
            a
            for a in self.alerts()
            if a["status"]["state"] == "active"
            and a["labels"].get("alertname") == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]


@contextlib.contextmanager
def alertmanagers(
    tmp_path: pathlib.Path, http_addr: str, count: int = 1, **options: str
) -> Iterator[list[Alertmanager]]:
    require_binary(
        services.alertmanager_binary() is not None, "prometheus-alertmanager (Debian's package; make install)"
    )
    members = [Alertmanager(tmp_path / f"am{i}", http_addr, **options) for i in range(count)]
    try:
        for member in members:
            member.start()
        yield members
    finally:
        for member in members:
            member.stop()


def alert_settings(settings: Settings, members: list[Alertmanager], resend: float = 60.0) -> Settings:
    return dataclasses.replace(
        settings,
        alertmanager_url=",".join(m.url for m in members),
        alert_resend=resend,
        cluster="test-cluster",
        public_url="https://hbreg.example.com",
    )


async def test_a_stall_fires_within_2_s_with_its_labels_and_its_recovery_resolves_it(
    pipeline_settings: Settings, tmp_path
) -> None:
    with alertmanagers(tmp_path, pipeline_settings.http_addr) as members:
        settings = alert_settings(pipeline_settings, members)
        await topics(settings)
        sink = await start_sink(settings, tmp_path / "alerter.log", "alerter")
        try:
            event = stall("agent-7", "job-7")
            event.figures["silence_ms"], event.figures["timeout_s"] = 3100, 3
            sent = time.monotonic()
            await send_events(settings, [event])
            await eventually(lambda: members[0].active("AgentStalled", agent_id="agent-7"), 2.0, every=0.05)
            fired = time.monotonic() - sent
            (alert,) = members[0].active("AgentStalled", agent_id="agent-7")
            assert alert["labels"] == {
                "alertname": "AgentStalled",
                "agent_id": "agent-7",
                "task_id": "job-7",
                "reason": "silent",
                "severity": "critical",
                "partition": "0",
                "cluster": "test-cluster",
            }
            assert "silent for 3.1 s" in alert["annotations"]["description"] and alert["annotations"]["summary"]
            assert alert["generatorURL"] == "https://hbreg.example.com/agents/agent-7"
            recovery = hb.AgentEvent(
                type=hb.RECOVERY,
                agent_id="agent-7",
                task_id="job-7",
                reason="silent",
                detected_at_ms=now_ms(),
                emitted_at_ms=now_ms(),
                event_id=f"{event.event_id.rsplit(':', 1)[0]}:recovery",
            )
            sent = time.monotonic()
            await send_events(settings, [recovery])
            await eventually(lambda: not members[0].active("AgentStalled", agent_id="agent-7"), 2.0, every=0.05)
            resolved = time.monotonic() - sent
        finally:
            procs.stop(sink)
    assert fired < 2 and resolved < 2, (fired, resolved)


async def test_an_alert_stays_active_across_resends_and_survives_a_killed_sink(
    pipeline_settings: Settings, tmp_path
) -> None:
    """Resend every 1 s, Alertmanager's resolve_timeout 0.5 s: no spurious resolve over more than three
    resend periods, also while the sink is SIGKILLed and restarted; the recovery then resolves it."""
    with alertmanagers(tmp_path, pipeline_settings.http_addr, resolve_timeout="500ms") as members:
        settings = alert_settings(pipeline_settings, members, resend=1.0)
        await topics(settings)
        log = tmp_path / "alerter.log"
        sink = await start_sink(settings, log, "alerter")
        try:
            event = stall("agent-8", "job-8")
            await send_events(settings, [event])
            await eventually(lambda: members[0].active("AgentStalled", agent_id="agent-8"), 2.0, every=0.05)
            for _ in range(20):  # 4 s: four resend periods
                assert members[0].active("AgentStalled", agent_id="agent-8"), "resolved while still stalled"
                await asyncio.sleep(0.2)
            procs.stop(sink, signal.SIGKILL)
            for _ in range(10):  # endsAt lies 4 resend periods ahead: it stays active meanwhile
                assert members[0].active("AgentStalled", agent_id="agent-8")
                await asyncio.sleep(0.2)
            sink = await start_sink(settings, log, "alerter")
            for _ in range(20):  # the restarted sink goes on re-sending (the firing set is in Redis)
                assert members[0].active("AgentStalled", agent_id="agent-8")
                await asyncio.sleep(0.2)
            await send_events(
                settings,
                [hb.AgentEvent(type=hb.RECOVERY, agent_id="agent-8", detected_at_ms=now_ms(), emitted_at_ms=now_ms())],
            )
            await eventually(lambda: not members[0].active("AgentStalled", agent_id="agent-8"), 3.0, every=0.1)
        finally:
            procs.stop(sink)


async def test_every_ha_member_gets_every_alert_and_a_restarted_one_learns_them_again(
    pipeline_settings: Settings, tmp_path
) -> None:
    with alertmanagers(tmp_path, pipeline_settings.http_addr, count=2) as members:
        settings = alert_settings(pipeline_settings, members, resend=1.0)
        await topics(settings)
        sink = await start_sink(settings, tmp_path / "alerter.log", "alerter")
        try:
            await send_events(settings, [stall("agent-9", "job-9"), stall("agent-10", "job-10")])
            for member in members:
                await eventually(lambda m=member: len(m.active("AgentStalled")) == 2, 3.0, every=0.1)
            members[1].stop()
            await asyncio.sleep(3.0)  # down for three resend periods
            await send_events(settings, [stall("agent-11", "job-11")])  # what it missed meanwhile
            members[1].start(fresh=True)  # empty storage
            back = time.monotonic()
            await eventually(lambda: len(members[1].active("AgentStalled")) == 3, 3.0, every=0.1)
            assert time.monotonic() - back < 2.5, "not within about one resend period (plus the retry backoff)"
            assert len(members[0].active("AgentStalled")) == 3
        finally:
            procs.stop(sink)


async def test_a_mass_silence_is_one_notification_and_inhibits_the_stalls_of_its_partition(
    pipeline_settings: Settings, tmp_path
) -> None:
    """30 agents of partition 0 silent together: one AgentsMassSilence notification reaches the webhook
    receiver, and a stall of one of them in the same partition is inhibited; the stall of an agent of
    another partition is notified (the positive control)."""
    server = QueryServer(pipeline_settings)
    await server.start()
    try:
        with alertmanagers(tmp_path, pipeline_settings.http_addr) as members:
            settings = alert_settings(pipeline_settings, members)
            await topics(settings)
            sink = await start_sink(settings, tmp_path / "alerter.log", "alerter")
            try:
                held = [f"held-{i:02d}" for i in range(30)]
                mass = hb.AgentEvent(
                    type=hb.MASS_SILENCE,
                    partition=0,
                    agent_ids=held,
                    detected_at_ms=now_ms(),
                    emitted_at_ms=now_ms(),
                    event_id=f"mass:0:{now_ms()}",
                    reason="30 of 35 agents of partition 0 went silent together",
                )
                inside = stall(held[0], "job-held")  # as if a worker confirmed one individually
                inside.partition = 0
                outside = stall("elsewhere", "job-elsewhere")
                outside.partition = 1
                await send_events(settings, [mass])
                await eventually(lambda: members[0].active("AgentsMassSilence"), 2.0, every=0.1)
                await send_events(settings, [inside, outside])

                def notified() -> list[dict]:
                    with urllib.request.urlopen(f"http://{settings.http_addr}/api/alerts", timeout=5) as response:
                        return list(json.load(response)["notifications"])

                async def a_stall_notified() -> bool:
                    found = await asyncio.to_thread(notified)  # the query API runs on this loop
                    return any(a["labels"]["alertname"] == "AgentStalled" for n in found for a in n["alerts"])

                await eventually(a_stall_notified, 15, every=0.5)
                await asyncio.sleep(3)  # anything more would have come by now (group_interval 1 s)
                alerts = [a for n in await asyncio.to_thread(notified) for a in n["alerts"] if a["status"] == "firing"]
            finally:
                procs.stop(sink)
    finally:
        await server.stop()
    masses = [a for a in alerts if a["labels"]["alertname"] == "AgentsMassSilence"]
    assert len(masses) == 1 and masses[0]["annotations"]["agents"] == ",".join(held)
    stalled = sorted(a["labels"]["agent_id"] for a in alerts if a["labels"]["alertname"] == "AgentStalled")
    assert stalled == ["elsewhere"], "a stall of the mass silence's partition was notified"
