"""The faust-streaming app: per-agent windows and liveness over the `heartbeats` topic.

Each `heartbeats` record carries a batch of heartbeats of one partition and that partition's watermark.
The agent folds the batch into in-memory accumulators and, when the watermark passes a window's end,
writes the window once (one table write per partition chunk, not per heartbeat: every table write also
produces a changelog record, which is what limits naive faust pipelines to a few thousand per second).
Table writes happen while iterating an event of the same partition, so changelog partitions line up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import faust
from faust.sensors.prometheus import setup_prometheus_sensors

from heartbeat_registry.names import Names
from heartbeat_registry.pb import hb
from heartbeat_registry.settings import Settings
from processors import metrics
from processors.partition import ClosedWindow, PartitionState

log = logging.getLogger(__name__)
ROWS_PER_CHUNK = 1000  # keeps one window table value well under Kafka's 1 MB record limit
WINDOW_RETENTION_S = 3600.0


def _chunks(closed: ClosedWindow) -> Iterator[tuple[int, dict[str, Any]]]:
    items = list(closed.rows.items())
    for n in range(0, max(len(items), 1), ROWS_PER_CHUNK):
        yield n // ROWS_PER_CHUNK, {agent: acc.dump() for agent, acc in items[n : n + ROWS_PER_CHUNK]}


def create_app(settings: Settings) -> faust.App:
    settings.require("kafka_bootstrap")
    names = Names.of(settings)
    partitions = settings.topic_partitions
    window_ms = int(settings.window_size * 1000)
    timeout_ms = int(settings.stall_timeout * 1000)
    host, _, port = settings.worker_web_addr.rpartition(":")
    app = faust.App(
        names.processors_app_id,
        broker=[f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",")],
        store="memory://",
        topic_partitions=partitions,
        # Records are acknowledged only after the windows they fed were written; on shutdown or
        # rebalance the unacknowledged ones are replayed by the next owner instead of awaited.
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        web_host=host,
        web_port=int(port),
        web_in_thread=False,
        producer_max_request_size=4 * 1024 * 1024,
    )
    heartbeats = app.topic(
        names.heartbeats_topic, key_serializer="raw", value_serializer="raw", partitions=partitions
    )
    events_topic = app.topic(
        names.events_topic, key_serializer="raw", value_serializer="raw", partitions=partitions
    )
    # partition -> snapshot of that partition's liveness (see PartitionState.snapshot)
    snapshots = app.Table("snapshots", default=dict, partitions=partitions)
    # tumbling windows; key "p<partition>c<chunk>" -> {agent_id: Accumulator.dump()}
    windows = app.Table("windows", default=dict, partitions=partitions).tumbling(
        settings.window_size, expires=WINDOW_RETENTION_S
    )
    states: dict[int, PartitionState] = {}

    def state_of(partition: int) -> PartitionState:
        state = states.get(partition)
        if state is None:
            snapshot = snapshots.get(partition)
            state = states[partition] = PartitionState.restore(partition, window_ms, timeout_ms, snapshot)
            metrics.WORKER_AGENTS.set(sum(len(s.liveness.agents) for s in states.values()))
        return state

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set, **_: Any) -> None:
        # faust seeks every partition back to its committed offset after a rebalance: rebuild from
        # the table and the replay rather than keep state that would then count twice.
        states.clear()

    @app.on_partitions_assigned.connect
    async def on_assigned(app: faust.App, assigned: set, **_: Any) -> None:
        mine = sorted(tp.partition for tp in assigned if tp.topic == heartbeats.get_topic_name())
        log.info("partitions assigned", extra={"partitions": ",".join(map(str, mine))})

    async def emit(event: hb.AgentEvent) -> None:
        event.emitted_at_ms = time.time_ns() // 1_000_000
        metrics.WORKER_EVENTS.labels(hb.EventType.Name(event.type).lower(), event.reason).inc()
        await events_topic.send(key=event.agent_id.encode(), value=event.SerializeToString())

    @app.agent(heartbeats)
    async def process(stream: faust.Stream) -> None:
        manual = stream.noack()
        async for event in manual.events():
            partition = event.message.partition
            state = state_of(partition)
            cols = hb.HeartbeatColumns.FromString(event.value)
            recoveries, newest = state.add(cols)
            stalls, closed = state.advance(cols.watermark_ms)
            for agent_event in (*recoveries, *stalls):
                await emit(agent_event)
            for window in closed:
                table = windows.relative_to(window.start / 1000)
                for chunk, rows in _chunks(window):
                    table[f"p{partition}c{chunk}"] = rows
            if closed or recoveries or stalls:
                snapshots[partition] = state.snapshot()
            metrics.WORKER_HEARTBEATS.inc(len(cols.agent_id))
            metrics.WORKER_WATERMARK_AGE.set(max(0.0, time.time() - state.liveness.watermark / 1000))
            state.hold(event, newest)
            for ready in state.releasable():
                await manual.ack(ready)

    setup_prometheus_sensors(app, name_prefix="hbreg_faust")

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """Ready once this worker owns partitions of `heartbeats` (after the consumer group joined)."""
        owned = sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == heartbeats.get_topic_name())
        return web.json({"ok": True, "partitions": owned})

    return app
