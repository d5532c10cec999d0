"""The faust-streaming app: per-agent windows and liveness over the `heartbeats` topic.

Each `heartbeats` record carries a batch of heartbeats of one partition and that partition's watermark.
The agent folds the batch into in-memory window stats and liveness state and, when the watermark passes
a window's end, writes the window once (a few table values per partition and window, not one per
heartbeat: every table write also produces a changelog record, which is what limits naive faust
pipelines to a few thousand heartbeats per second). Liveness state goes to the `snapshots` table in
chunks, at most once a second while it changes and always before an acknowledgement, with the
partition's meta before every acknowledgement. Table writes happen
while iterating an event of the same partition, so changelog partitions line up; when a partition goes
quiet with window rows still to write, the worker sends that partition a watermark tick of its own so
the writes (and the acknowledgements waiting for them) complete. Which records may be acknowledged
when: processors/partition.py.

A failure inside the agent leaves the in-memory state half-updated, so the worker does not let faust
restart the agent on it: it reports unhealthy and exits non-zero, and its partitions are rebuilt from
the tables by the next owner (or by this worker, restarted by its supervisor).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import time
from collections.abc import Iterable
from typing import Any, cast

import faust
from faust.sensors.prometheus import setup_prometheus_sensors
from faust.tables.wrappers import WindowWrapper
from faust.types import StreamT
from google.protobuf.message import DecodeError

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.events import event_ids_since
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import Replication
from heartbeat_registry.pb import hb
from processors import faust_adapter, metrics
from processors.liveness import rules_of
from processors.partition import SNAPSHOT_CHUNKS, PartitionState
from processors.publish import QueryStore
from processors.recovery_watch import STUCK_ERROR, RecoveryWatch

log = logging.getLogger(__name__)
PUBLISH_EVERY_S = 0.1
WINDOW_CHUNKS_PER_RECORD = 2
LAG_CHECK_EVERY_S = 0.25
# a partition with window rows left to write and no record for this long gets a tick of the worker's own
QUIET_TICK_S = 0.2
# changed agents' snapshot chunks are written at most this often per partition (and before any release)
SNAPSHOT_EVERY_S = 1.0
# a restored partition checks its events against those sent since its snapshot was saved, less this
# (the predecessor's clock stepping back in between)
SENT_BEFORE_MARGIN_MS = 2000
SENT_BEFORE_TIMEOUT_S = 5.0


@dataclasses.dataclass
class WorkerStatus:
    """What `/healthz` and the exit code report."""

    fatal: str | None = None  # why the worker is stopping on its own
    hooks_logged: bool = False


def lag_event_id(partitions: Iterable[int], at_ms: int, cleared: bool = False) -> str:
    """The id of a worker's pipeline_lag (or, `cleared`, pipeline_caught_up) event. Every worker raises its
    own, and two of them can do so in the same millisecond (the chaos soak saw it once in thirty minutes,
    a paused bridge holding back partitions of both): the partitions it judges, which no two workers
    share, keep their ids apart."""
    return f"lag:{'-'.join(map(str, sorted(partitions)))}:{at_ms}" + (":cleared" if cleared else "")


def create_app(settings: Settings) -> tuple[faust.App, WorkerStatus]:
    assert settings.kafka_bootstrap is not None and settings.redis_url is not None
    bootstrap = settings.kafka_bootstrap
    names = Names.of(settings)
    partitions = settings.topic_partitions
    window_ms = int(settings.window_size * 1000)
    grace_ms = int(settings.window_grace * 1000)
    rules = rules_of(settings)
    status = WorkerStatus()
    host, _, port = settings.worker_web_addr.rpartition(":")
    datadir = settings.state_dir / "faust"  # faust keeps a small local folder; not the working directory
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        names.processors_app_id,
        broker=[f"kafka://{b.strip()}" for b in bootstrap.split(",")],
        store="memory://",
        topic_partitions=partitions,
        # Records are acknowledged only after the windows they fed were written; on shutdown or
        # rebalance the unacknowledged ones are replayed by the next owner instead of awaited.
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # a dead worker's partitions move to the others after this long (faust's default is 60 s,
        # during which nobody judges those agents)
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        # static membership: a worker restarted under the same name rejoins with its old partitions at
        # once, where a new member would wait for the dead one's session to time out first
        consumer_group_instance_id=settings.instance,
        web_host=host,
        web_port=int(port),
        web_in_thread=False,
        producer_max_request_size=4 * 1024 * 1024,
        # nothing runs `on_leader`, so no leader-election topic: with room (hook 4 below) the worker
        # subscribed before a fresh one showed in the broker's metadata, and aiokafka logged an error
        topic_disable_leader=True,
        # faust creates the changelogs with these replicas if the worker had not; its producer waits for
        # every in-sync replica (faust's default, said here because a record acknowledged by the leader
        # alone is lost when that broker dies)
        topic_replication_factor=settings.kafka_replication_factor,
        # No standby replicas of the tables. With faust's default (one), every worker also consumes the
        # other workers' changelogs all the time, for a head start only when it takes over partitions
        # after a session timeout; a worker restarted under its own name reads its changelogs anyway.
        # And a rebalance that turned standby changelog partitions active could hang faust's recovery:
        # it sought them back to their start and waited for good for records it never got (the worker
        # took no record of its partitions and committed nothing; found by tests/processors/test_crash.py
        # and test_detection.py in CI, "No event received for active tp" in faust's recovery log; which
        # of faust's drops of fetched records took them, its log does not say: docs/reliability.md).
        table_standby_replicas=0,
        producer_acks=-1,
        datadir=str(datadir),
        TableManager=faust_adapter.TableManager,  # hook 4: no 1 s sleep before the first subscription
    )
    faust_adapter.install(app)  # before the first topic: faust builds its transport on demand
    heartbeats = app.topic(names.heartbeats_topic, key_serializer="raw", value_serializer="raw", partitions=partitions)
    events_topic = app.topic(names.events_topic, key_serializer="raw", value_serializer="raw", partitions=partitions)
    # "p<partition>" -> PartitionState.snapshot_meta() and saved_ms; "p<partition>/<chunk>" -> {agent_id: Agent.dump()}
    changelog_configs = Replication.of(settings).configs
    snapshots = app.Table("snapshots", default=dict, partitions=partitions, extra_topic_configs=changelog_configs)
    # tumbling windows; key "p<partition>c<chunk>" -> {agent_id: WindowStats.summary()}. Readers get window
    # rows from the query store (kept HBREG_WINDOW_RETENTION); the worker itself reads back only the rows
    # a restore needs (`last_beats`: the stall timeout and two windows before the last closed one), so it
    # keeps those and a minute more for a restart, not an hour of every agent's windows in memory.
    windows_kept = settings.stall_timeout + 3 * settings.window_size + settings.window_grace + 60.0
    windows = cast(
        WindowWrapper,
        app.Table("windows", default=dict, partitions=partitions, extra_topic_configs=changelog_configs).tumbling(
            settings.window_size, expires=windows_kept
        ),
    )
    states: dict[int, PartitionState] = {}
    sent_before: dict[int, set[str]] = {}  # partition -> ids of events sent since its snapshot was saved
    unchecked: set[int] = set()  # partitions gained whose sent events were not read yet (check_sent)
    last_record: dict[int, float] = {}  # partition -> monotonic time its last record was folded in
    last_snapshot: dict[int, float] = {}  # partition -> monotonic time its snapshot chunks were last written
    store = QueryStore(redis_client.connect(settings, socket_timeout=5.0), names, settings.window_retention)
    lag = {"raised": False}

    def last_beats(partition: int, since: int, until: int) -> dict[str, int]:
        """agent -> newest beat in the written window rows of `partition` for windows in [since, until)."""
        seen: dict[str, int] = {}
        first = since - since % window_ms
        for start in range(max(first, 0), until, window_ms):
            at = windows.relative_to(start / 1000)
            for chunk in itertools.count():  # written in order from 0, so the first missing ends them
                rows = at[f"p{partition}c{chunk}"].value()
                if not rows:
                    break
                for agent, row in rows.items():
                    if row[4] > seen.get(agent, 0):
                        seen[agent] = row[4]
        return seen

    async def state_of(partition: int) -> PartitionState:
        state = states.get(partition)
        if state is None:
            meta = snapshots.get(f"p{partition}")
            chunks = [snapshots.get(f"p{partition}/{c}") for c in range(SNAPSHOT_CHUNKS)]
            seen = {}
            if meta:
                # an alive agent beat within the timeout, so rows that ended before that cannot be newer
                until = meta.get("closed_until", 0)
                seen = last_beats(partition, until - rules.timeout_ms - 2 * window_ms, until)
            state = PartitionState.restore(partition, window_ms, rules, meta, chunks, seen, grace_ms)
            states[partition] = state
            if partition in unchecked:
                await check_sent(unchecked)
            log.info(
                "partition state restored",
                extra={
                    "partition": partition,
                    "agents": len(state.liveness.agents),
                    "next_offset": state.next_offset,
                    "sent_before": len(sent_before.get(partition, ())),
                },
            )
            metrics.WORKER_AGENTS.set(sum(len(s.liveness.agents) for s in states.values()))
        return state

    async def check_sent(partitions: set[int]) -> None:
        """The previous owner sends a record's events before the snapshot that records them, in another
        produce request (the events first: a worker killed in between must repeat an event, not lose it).
        Killed in between, it leaves a snapshot from before those events, and its successor judges the
        same episodes again, with the same event ids: those sent since the oldest of the gained partitions'
        snapshots was saved it does not send twice. One read for all partitions an assignment gained, at
        the first one's first record (their snapshots are recovered by then). Without it (Kafka slow or
        away), the worker goes on and may repeat an event."""
        gained = set(partitions)  # an assignment meanwhile may add more, for the next record to check
        saved = [meta["saved_ms"] for p in gained if "saved_ms" in (meta := snapshots.get(f"p{p}") or {})]
        ids: set[str] = set()
        if saved:
            try:
                async with asyncio.timeout(SENT_BEFORE_TIMEOUT_S):
                    ids = await event_ids_since(bootstrap, names.events_topic, min(saved) - SENT_BEFORE_MARGIN_MS)
            except Exception as exc:
                log.warning(
                    "could not read the events sent since the snapshots: one sent just before the previous "
                    "owner stopped may be sent again",
                    extra={"error": repr(exc)},
                )
        for p in gained:
            sent_before[p] = ids
        partitions.difference_update(gained)

    watching: list[asyncio.Future[None]] = []  # the recovery watch, once started

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # faust's receiver type is stricter than its calls
    async def on_assigned(sender: Any, assigned: set[Any], **_: Any) -> None:
        """A partition this worker keeps keeps its state: faust seeks back to the committed offset, and
        `place()` skips what the state already holds (it may also hand over records from before the seek,
        or none again when nothing was committed yet: both simply continue the state). A partition it
        lost is dropped; one it gains is built from the tables when its first record comes. faust forgot
        the acknowledgements of the kept ones since its last commit (`settle`)."""
        if not watching:
            watching.append(app.add_future(watch_recovery()))  # stopped with the app
        mine = sorted(tp.partition for tp in assigned if tp.topic == heartbeats.get_topic_name())
        for partition in set(states) - set(mine):
            del states[partition]
            sent_before.pop(partition, None)
        unchecked.intersection_update(mine)
        unchecked.update(p for p in mine if p not in states)
        for state in states.values():
            state.settle()
        log.info("partitions assigned", extra={"partitions": ",".join(map(str, mine))})

    async def emit(event: hb.AgentEvent) -> None:
        event.emitted_at_ms = now_ms()
        metrics.WORKER_EVENTS.labels(hb.EventType.Name(event.type).lower(), event.reason).inc()
        await events_topic.send(key=event.agent_id.encode(), value=event.SerializeToString())

    async def fold(event: Any, manual: Any) -> None:
        """One record: fold it in, write what became final, acknowledge what is safe (partition.py)."""
        partition = event.message.partition
        state = await state_of(partition)
        now = last_record[partition] = time.monotonic()
        offset = event.message.offset
        tp = event.message.tp
        consumer = faust_adapter.consumer(app)
        committed = consumer.committed_offset(tp)
        if state.settled_until is not None and committed is not None:
            if committed < state.settled_until:  # in the tables, not acknowledged in faust's eyes (partition.py)
                await consumer.add_gap(tp, committed, state.settled_until - 1)
            state.settled_until = None
        place = state.place(offset, now, committed)
        if place < 0:
            return  # delivered again after a seek back: folded in already
        if place > 0:
            metrics.WORKER_EARLY.inc()
            if state.seek_due(now):
                await refetch(tp, state.next_offset)
            return
        if state.missed:
            first, last = state.missed
            state.missed = None
            await consumer.add_gap(tp, first, last - 1)
            metrics.WORKER_MISSED.inc(last - first)
            log.warning(
                "records skipped: committed or gone before this worker saw them",
                extra={
                    "partition": partition,
                    "from_offset": first,
                    "to_offset": last,
                },
            )
        try:
            cols = hb.HeartbeatColumns.FromString(event.value)
        except (DecodeError, TypeError):  # TypeError: a record without a value
            metrics.WORKER_POISON.inc()
            log.warning(
                "skipped a heartbeats record that is no HeartbeatColumns",
                extra={"partition": partition, "offset": offset},
            )
            cols = hb.HeartbeatColumns()  # folded in as a record without heartbeats or watermark
        late, repeats = state.late, state.repeats
        events, newest = state.fold(cols)
        if state.late != late:
            metrics.WORKER_LATE.inc(state.late - late)
        if state.repeats != repeats:
            metrics.WORKER_REPEATED.inc(state.repeats - repeats)
        for agent_event in events:
            if agent_event.event_id in sent_before.get(partition, ()):
                metrics.WORKER_SENT_BEFORE.inc()
                log.info("not sent again: the previous owner sent it", extra={"event_id": agent_event.event_id})
                continue
            await emit(agent_event)
        written = state.written_until
        for window, chunk, rows in state.next_window_chunks(WINDOW_CHUNKS_PER_RECORD):
            windows.relative_to(window.start / 1000)[f"p{partition}c{chunk}"] = rows
        metrics.WORKER_HEARTBEATS.inc(len(cols.agent_id))
        state.hold(event, offset, newest)
        ready = state.releasable()
        now = time.monotonic()
        if state.dirty and (ready or events or now - last_snapshot.get(partition, 0.0) >= SNAPSHOT_EVERY_S):
            # Coalesced: a chunk is one table value, so writing it per record while many agents change
            # at once (a fleet starting) fills the changelog with copies and stalls the stream on faust's
            # producer buffer. Written before any release, so acknowledged records are in the snapshot,
            # and with every event, so a worker killed after sending one does not send it again.
            last_snapshot[partition] = now
            for chunk, agents in state.dirty_chunks().items():
                snapshots[f"p{partition}/{chunk}"] = agents
        if ready or state.written_until != written or events:
            # before the acknowledgements: the commit that follows them flushes this first
            snapshots[f"p{partition}"] = {**state.snapshot_meta(), "saved_ms": now_ms()}  # saved_ms: check_sent
        for record in ready:
            consumer.release(record.message)  # hook 6: only these acknowledgements count
            await manual.ack(record)

    async def refetch(tp: Any, offset: int) -> None:
        """Fetch `tp` again from `offset`, the record its state needs (processors/partition.py)."""
        metrics.WORKER_SEEKS.inc()
        log.info(
            "records came ahead of the one needed: fetching again from it",
            extra={"partition": tp.partition, "offset": offset},
        )
        try:
            await app.consumer.seek_wait({tp: offset})
        except Exception as exc:  # revoked meanwhile; or the next early record tries again
            log.warning("could not seek back", extra={"partition": tp.partition, "error": repr(exc)})

    def fail(exc: BaseException) -> None:
        """Stop for good: the in-memory state can no longer be trusted (see the module docstring)."""
        status.fatal = f"{type(exc).__name__}: {exc}"
        log.error("worker cannot go on, stopping (exit code 1)", exc_info=exc, extra={"error": status.fatal})
        os.kill(os.getpid(), signal.SIGTERM)  # faust's own graceful shutdown; `worker.run` returns 1

    @app.agent(heartbeats)
    async def process(stream: StreamT[Any]) -> None:
        manual = cast(faust.Stream, stream).noack()
        try:
            async for event in manual.events():
                await fold(event, manual)
        except Exception as exc:
            fail(exc)
            # Not raised: faust would start the agent again on the half-updated state, and it could fold
            # and acknowledge more records before the shutdown. The shutdown cancels this wait.
            await asyncio.Event().wait()

    @app.timer(QUIET_TICK_S)
    async def tick_quiet_partitions() -> None:
        """A tick for each partition with window rows left to write that got no record lately (bridge
        stopped, end of a backlog): the rows are written, and the records waiting for them acknowledged,
        while folding it in, where table writes land in the right changelog partition. It repeats the
        watermark the partition already has, so it claims nothing new about the pipeline's clock."""
        now = time.monotonic()
        for partition, state in list(states.items()):
            if state.unwritten and now - last_record.get(partition, now) >= QUIET_TICK_S:
                tick = hb.HeartbeatColumns(watermark_ms=state.liveness.watermark)
                try:
                    await heartbeats.send(value=tick.SerializeToString(), partition=partition)
                except Exception as exc:  # the next timer tries again
                    log.warning("could not send a watermark tick", extra={"partition": partition, "error": repr(exc)})
                    continue
                last_record[partition] = now
                metrics.WORKER_SELF_TICKS.inc()

    @app.timer(PUBLISH_EVERY_S)
    async def publish() -> None:
        if not status.hooks_logged and states:
            status.hooks_logged = True
            log.info(
                "faust hooks in effect",
                extra={
                    "fetch_max_wait_ms": faust_adapter.fetch_max_wait_ms(app),
                    **faust_adapter.VERIFIED,
                },
            )
        try:
            await store.publish(states)
        except Exception as exc:  # the query store is a view: detection goes on without it
            log.warning("publishing to the query store failed", extra={"error": repr(exc)})

    async def watch_recovery() -> None:
        """Every second, from the first assignment on, whether faust's table recovery is stuck (not an
        `app.timer`: faust starts those only once the first recovery is done, and that one can stick too)."""
        watch = RecoveryWatch()
        recovery = cast(Any, app.tables).recovery  # faust's TableManager has one; its interface type does not
        while status.fatal is None:
            await asyncio.sleep(1.0)
            remaining = recovery.active_remaining_total()
            if watch.stuck(recovery.in_recovery, remaining, time.monotonic()):
                fail(
                    RuntimeError(
                        f"{STUCK_ERROR} for {watch.limit_s:.0f} s with {remaining} left; started again, the "
                        "worker reads them afresh"
                    )
                )

    @app.timer(LAG_CHECK_EVERY_S)
    async def watch_lag() -> None:
        """pipeline_lag when this worker's newest pipeline time falls behind the wall clock (the bridge,
        Kafka or this worker is stuck or slow): agents are not judged meanwhile, because their clock
        stopped too; pipeline_caught_up when it is back."""
        marks = [s.liveness.watermark for s in states.values() if s.liveness.watermark]
        if not marks:
            return
        now = now_ms()
        behind = now - min(marks)
        metrics.WORKER_WATERMARK_AGE.set(behind / 1000)
        limit = settings.lag_alert * 1000
        if not lag["raised"] and behind > limit:
            lag["raised"] = True
            await emit(
                hb.AgentEvent(
                    type=hb.PIPELINE_LAG,
                    reason=f"pipeline clock {behind / 1000:.1f} s behind on partitions "
                    + ",".join(map(str, sorted(states))),
                    detected_at_ms=now,
                    event_id=lag_event_id(states, now),
                    figures={"lag_s": behind / 1000, "limit_s": settings.lag_alert},
                )
            )
        elif lag["raised"] and behind < limit / 2:
            lag["raised"] = False
            await emit(
                hb.AgentEvent(
                    type=hb.PIPELINE_CAUGHT_UP,
                    reason="pipeline clock caught up",
                    detected_at_ms=now,
                    event_id=lag_event_id(states, now, cleared=True),
                    figures={"lag_s": behind / 1000},
                )
            )

    setup_prometheus_sensors(app, name_prefix="hbreg_faust")

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """Ready once this worker owns partitions of `heartbeats` (after the consumer group joined);
        503 once it is stopping on its own. `committed`: each owned partition's committed offset."""
        owned = sorted(tp for tp in app.assignor.assigned_actives() if tp.topic == heartbeats.get_topic_name())
        body = {
            "ok": status.fatal is None,
            "partitions": [tp.partition for tp in owned],
            "committed": {str(tp.partition): faust_adapter.consumer(app).committed_offset(tp) for tp in owned},
        }
        if status.fatal is not None:
            body["error"] = status.fatal
        return web.json(body, status=200 if status.fatal is None else 503)

    return app, status
