"""The Alertmanager sink (`hbreg alerter`): keeps Alertmanager's view of our problems right, the way
Prometheus talks to Alertmanager (sinks/alerts.py has the alerts and the sender semantics).

- Its own consumer group on `agent-events`: a stall raises `AgentStalled`, its recovery resolves it;
  likewise `AgentsMassSilence` and `PipelineLag`. `TaskOrphaned` comes from the task registry (a task
  orphaned for longer than HBREG_ORPHAN_ALERT; resolved once it has an owner again).
- The alerts live in Redis (`alerts` hash), written before an event's offset is committed, so a
  restarted sink goes on re-sending and resolving them.
- Every alert goes to every member of HBREG_ALERTMANAGER_URL (Alertmanager's HA design: members
  deduplicate notifications by gossip): changes at once, the whole set every HBREG_ALERT_RESEND. A member
  that fails is retried with backoff and gets the whole set once it answers again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from prometheus_client import Counter, Gauge

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import health, redis_client
from heartbeat_registry.core.events import sink_event
from heartbeat_registry.core.lifecycle import stop_signal
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tasks import ORPHANED, TaskStore
from heartbeat_registry.core.topics import Replication, ensure_topics, pipeline_topics
from heartbeat_registry.pb import hb
from sinks.alerts import Alert, change_for, orphan_alert, sendable

log = logging.getLogger(__name__)
SENT = Counter("hbreg_alerts_sent_total", "Alerts sent to an Alertmanager member", ["member", "state"])
SEND_ERRORS = Counter("hbreg_alerts_send_errors_total", "Failed sends to an Alertmanager member", ["member"])
FIRING = Gauge("hbreg_alerts_firing", "Alerts firing now")
MEMBER_UP = Gauge("hbreg_alerts_member_up", "1 while the Alertmanager member takes our alerts", ["member"])
UNDECODABLE = Counter(
    "hbreg_alerts_undecodable_records_total",
    "agent-events records that are no AgentEvent the sink can send, counted and skipped",
)
TICK_S = 0.5


def unsendable(event: hb.AgentEvent) -> str | None:
    """Why Alertmanager could not take the alerts of `event`, or None."""
    if sendable(event):
        return None
    return f"times without an RFC 3339 form ({event.detected_at_ms}, {event.emitted_at_ms})"


def agent_event(record: Any) -> hb.AgentEvent | None:
    return sink_event(record, UNDECODABLE, log, unsendable)


class Member:
    """One Alertmanager: when it gets the whole set next, and its backoff after failures."""

    def __init__(self, url: str, resend_s: float) -> None:
        self.url = url.rstrip("/")
        self.resend_s = resend_s
        self.next_full = 0.0  # monotonic
        self.backoff = 0.0

    def sent(self, full: bool) -> None:
        self.backoff = 0.0
        MEMBER_UP.labels(self.url).set(1)
        if full:
            self.next_full = time.monotonic() + self.resend_s

    def failed(self) -> None:
        self.backoff = min(max(self.backoff * 2, 0.5), self.resend_s)
        self.next_full = time.monotonic() + self.backoff  # then the whole set, whatever it missed
        MEMBER_UP.labels(self.url).set(0)
        SEND_ERRORS.labels(self.url).inc()

    @property
    def reachable(self) -> bool:
        return self.backoff == 0.0


class AlertSink:
    def __init__(self, settings: Settings, client: aioredis.Redis, urls: list[str]) -> None:
        self.settings = settings
        self.names = Names.of(settings)
        self.redis = client
        self.tasks = TaskStore(client, self.names)
        self.members = [Member(url, settings.alert_resend) for url in urls]
        self.resend_ms = int(settings.alert_resend * 1000)
        self.public_url = settings.public_url or f"http://{settings.http_addr}"
        self.consumer = AIOKafkaConsumer(
            self.names.events_topic,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=self.names.alerts_group,
            group_instance_id=settings.instance,  # static membership: a restart takes its partitions back at once
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self.http: aiohttp.ClientSession | None = None
        self.healthy = False

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        if self.http is not None:
            await self.http.close()

    async def alerts(self) -> dict[str, Alert]:
        raw = await self.redis.hgetall(self.names.alerts)
        return {(k.decode() if isinstance(k, bytes) else k): Alert.load(json.loads(v)) for k, v in raw.items()}

    async def _save(self, changed: list[Alert]) -> None:
        if changed:
            await self.redis.hset(self.names.alerts, mapping={a.key: json.dumps(a.dump()) for a in changed})

    async def apply(self, events: list[hb.AgentEvent]) -> list[Alert]:
        """The alert state the events imply, durable in Redis before their offsets are committed."""
        known = await self.alerts()
        changed: dict[str, Alert] = {}
        for event in events:
            change = change_for(event, self.settings.cluster, self.public_url)
            if change is None:
                continue
            if change.alert is not None:
                current = changed.get(change.key) or known.get(change.key)
                if current is None or current.resolved_ms is not None or current.labels != change.alert.labels:
                    changed[change.key] = change.alert
            else:
                current = changed.get(change.key) or known.get(change.key)
                if current is not None and current.resolved_ms is None:
                    current.resolved_ms = max(change.at_ms, current.starts_ms)
                    changed[change.key] = current
        await self._save(list(changed.values()))
        return list(changed.values())

    async def orphans(self) -> list[Alert]:
        """TaskOrphaned for tasks orphaned too long; resolved for those that have an owner again."""
        now = now_ms()
        limit_ms = int(self.settings.orphan_alert * 1000)
        orphaned = dict(await self.tasks.in_state(ORPHANED, limit=10_000))
        known = await self.alerts()
        changed = []
        for task_id, since in orphaned.items():
            key = f"TaskOrphaned:{task_id}"
            if now - since >= limit_ms and (key not in known or known[key].resolved_ms is not None):
                record = await self.tasks.get(task_id)
                if record is not None:
                    changed.append(orphan_alert(task_id, record, self.settings.cluster, self.public_url))
        for key, alert in known.items():
            if key.startswith("TaskOrphaned:") and alert.resolved_ms is None and key[13:] not in orphaned:
                alert.resolved_ms = now
                changed.append(alert)
        await self._save(changed)
        return changed

    async def send(self, member: Member, alerts: list[Alert], full: bool) -> None:
        assert self.http is not None
        now = now_ms()
        body = [a.postable(now, self.resend_ms) for a in alerts]
        try:
            async with self.http.post(f"{member.url}/api/v2/alerts", json=body) as response:
                if response.status >= 300:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status, message=(await response.text())[:200]
                    )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if member.reachable:
                log.warning(
                    "alertmanager member refused or unreachable; retrying with backoff",
                    extra={"member": member.url, "error": repr(exc)},
                )
            member.failed()
            return
        if not member.reachable:
            log.info("alertmanager member back: sent it the whole set", extra={"member": member.url})
        member.sent(full)
        for alert in alerts:
            SENT.labels(member.url, "firing" if alert.resolved_ms is None else "resolved").inc()

    async def push(self, changed: list[Alert]) -> None:
        """Changes at once, to every member that is not backing off (those get the whole set later)."""
        if changed:
            await asyncio.gather(*(self.send(m, changed, full=False) for m in self.members if m.reachable))

    async def resend_due(self) -> None:
        """The whole set to every member due: firing alerts with a fresh endsAt, resolved ones for 15 min."""
        due = [m for m in self.members if time.monotonic() >= m.next_full]
        if not due:
            return
        now = now_ms()
        alerts = await self.alerts()
        expired = [k for k, a in alerts.items() if a.expired(now)]
        if expired:
            await self.redis.hdel(self.names.alerts, *expired)
        current = [a for k, a in alerts.items() if k not in expired]
        FIRING.set(sum(1 for a in current if a.resolved_ms is None))
        if current:
            await asyncio.gather(*(self.send(m, current, full=True) for m in due))
        else:
            for member in due:
                member.sent(full=True)

    async def run(self, stop: asyncio.Event) -> None:
        next_orphan_check = 0.0
        while not stop.is_set():
            batch = await self.consumer.getmany(timeout_ms=int(TICK_S * 1000))
            try:
                decoded = (agent_event(record) for records in batch.values() for record in records)
                changed = await self.apply([event for event in decoded if event is not None])
                if batch:
                    await self.consumer.commit()  # after the state they imply is in Redis
                if time.monotonic() >= next_orphan_check:
                    next_orphan_check = time.monotonic() + 1.0
                    changed += await self.orphans()
                await self.push(changed)
                await self.resend_due()
                self.healthy = True
            except Exception as exc:  # Redis away: the uncommitted events come again
                self.healthy = False
                log.warning("alerting cycle failed, retrying", extra={"error": repr(exc)})
                for tp, records in batch.items():
                    self.consumer.seek(tp, records[0].offset)
                await asyncio.sleep(1.0)


async def serve(settings: Settings) -> None:
    settings.require("redis_url", "kafka_bootstrap")
    assert settings.redis_url is not None and settings.kafka_bootstrap is not None
    stop = stop_signal()
    urls = [u.strip() for u in (settings.alertmanager_url or "").split(",") if u.strip()]
    sink: AlertSink | None = None
    cleanup = await health.serve(settings.alerts_metrics_addr, lambda: not urls or bool(sink and sink.healthy))
    if not urls:
        log.warning("alerts are off: HBREG_ALERTMANAGER_URL is not set")
        await stop.wait()
        await cleanup()
        return
    await ensure_topics(
        settings.kafka_bootstrap,
        pipeline_topics(Names.of(settings), settings.topic_partitions, Replication.of(settings)),
    )
    client = redis_client.connect(settings, socket_timeout=5.0)
    sink = AlertSink(settings, client, urls)
    await sink.start()
    log.info("alertmanager sink running", extra={"members": ",".join(urls), "resend_s": settings.alert_resend})
    try:
        await sink.run(stop)
    finally:
        await sink.stop()
        await cleanup()
        await client.aclose()
        log.info("alertmanager sink stopped")
