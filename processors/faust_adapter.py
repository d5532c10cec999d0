"""faust-streaming's and aiokafka's private internals, behind one door: every touch of a private name of
either library is in this module, each hook says what it changes and why, and `verify()` refuses to run
on library versions the hooks were not verified against (or whose private names are gone).

The hooks, all on the worker's Kafka consumer (installed with `install(app)`, which replaces the app's
transport through faust's public `App.transport` setter):

1. Fetch wait 100 ms instead of faust's hard-coded 1,500 ms (`AIOKafkaConsumer._fetch_max_wait_ms`,
   set in `_create_worker_consumer`). faust pauses and resumes partitions around processing; a record of
   a partition resumed while an empty fetch was held at the broker waited for that fetch: measured here
   as stalls of up to 1.5 s between the bridge producing a record and the worker seeing it (hb->table p99
   186-1,400 ms over six runs; 239 ms with the hook). The price: more idle fetch round trips.
2. After a rebalance faust seeks every partition back to its committed offset so that records fetched
   but not processed come again (`AIOKafkaConsumerThread.seek_to_committed`, in the consumer's thread).
   aiokafka seeks only to committed offsets above 0, so a partition with nothing committed yet (a new
   consumer group, within its first window) stayed where the fetch had got to and the records faust
   discarded never came: those partitions go back to their beginning. Found by the two-worker kill
   test (stalls missed, healthy agents stalled).
3. The committed offset faust last committed or sought to (`Consumer._committed_offset`), which
   `PartitionState.place()` needs to tell records that will come again from records committed unseen.

And one on the app's table manager (faust's public `TableManager` setting, `create_app` passes it):

4. faust's `TableManager.on_start` sleeps 1 s before it registers the tables' changelogs, so that tables
   defined after the app started still make the first subscription; the consumer does not join its group
   until then. The worker defines every table before it starts (a later one fails loudly: "Too late to
   add tables"), so the sleep was one second of every worker (re)start in which nobody judged its
   partitions. Measured with room: 1.5 s from spawn to partitions assigned, 0.5 s without the sleep;
   under the 2,000-agent chaos soak a killed worker's recovery went from 4.7-5.6 s to 3.7-4.9 s.
   `TableManager.on_start` does the rest of faust's `on_start` (`_update_channels`, then recovery).

And two more on the consumer:

5. No gaps of faust's guessing (`Consumer._add_gap`). faust takes any record more than one offset past
   the last one it delivered for a hole in the log (compaction, transaction markers) and counts the
   offsets in between as acknowledged. On `heartbeats` (written by idempotent producers without
   transactions, never compacted) such a jump comes only from records fetched before a seek that
   arrive after it: at every worker start, records fetched before faust's seek to the committed
   offset. The "gap" then holds records the worker had not folded in or still held, so faust could
   commit past them, and the duplicates it added to its list of acknowledged offsets broke its run of
   consecutive offsets: measured, the restarted worker's commits crept one or two offsets a second
   behind a head thousands ahead. The worker reports the offsets faust may count as done itself
   (`add_gap`): those a restored snapshot already holds, and those `PartitionState.place()` gave up
   waiting for.

6. Only the worker's own acknowledgements count (`Consumer.ack`). faust's stream also acknowledges the
   records it skips itself, those delivered while the group rebalances (an old generation, or flow
   control off), which the worker never saw. When they followed the committed offset, faust committed
   past them: a crash then lost them for good, and a live worker went on without them
   (`PartitionState.place`'s committed-unseen case) though they were still in Kafka. The worker marks
   each record it releases (`release`), after its windows are written; any other acknowledgement of a
   record is not taken, and the record comes again after a seek.

faust's public API covers the rest (tables, `stream.noack()`, `event.ack()`, `Consumer.seek_wait`,
timers, pages).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic
from faust import tables
from faust.transport.drivers import aiokafka as driver
from mode.utils.times import want_seconds

from heartbeat_registry.errors import ConfigError

log = logging.getLogger(__name__)

# the versions the hooks were verified against, with the whole test suite and the benchmarks
VERIFIED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}
FETCH_MAX_WAIT_MS = 100


def verify(allow_untested: bool) -> None:
    """Refuse to start on other faust-streaming/aiokafka versions, or where a hooked name is gone.

    `allow_untested` (HBREG_ALLOW_UNTESTED_VERSIONS) starts anyway, after an error line saying so."""
    found = {name: metadata.version(name) for name in VERIFIED}
    problems = [f"{name} {found[name]} (verified: {want})" for name, want in VERIFIED.items() if found[name] != want]
    missing = [
        f"{owner.__qualname__}.{name}"
        for owner, name in (
            (driver.AIOKafkaConsumerThread, "_create_worker_consumer"),
            (driver.AIOKafkaConsumerThread, "seek_to_committed"),
            (driver.AIOKafkaConsumerThread, "_ensure_consumer"),
            (driver.Consumer, "_new_consumer_thread"),
            (driver.Consumer, "_add_gap"),
            (driver.Consumer, "ack"),
            (tables.TableManager, "_update_channels"),
        )
        if not hasattr(owner, name)
    ]
    if missing:
        problems.append("hooked names gone: " + ", ".join(missing))
    if not problems:
        return
    message = (
        "the worker's faust hooks (processors/faust_adapter.py) were verified with "
        + ", ".join(f"{k} {v}" for k, v in VERIFIED.items())
        + "; found "
        + "; ".join(problems)
    )
    if not allow_untested:
        raise ConfigError(message + " (HBREG_ALLOW_UNTESTED_VERSIONS=on starts anyway)")
    log.error("STARTING ON UNTESTED VERSIONS (HBREG_ALLOW_UNTESTED_VERSIONS=on): " + message)


async def seek_back(consumer: AIOKafkaConsumer, keep: Iterable[str] = ()) -> Mapping[TopicPartition, int | None]:
    """Hook 2: seek every assigned partition to its committed offset, and those without one (other than
    the topics in `keep`) to their beginning. Returns the committed offsets."""
    committed: Mapping[TopicPartition, int | None] = await consumer.seek_to_committed()
    kept = set(keep)
    fresh = [tp for tp, offset in committed.items() if not offset and tp.topic not in kept]
    if fresh:
        await consumer.seek_to_beginning(*fresh)
    return committed


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        consumer: AIOKafkaConsumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # hook 1; read when the consumer starts its fetcher
        return consumer

    async def seek_to_committed(self) -> Mapping[Any, int]:
        # hook 2; changelogs are positioned by faust's table recovery, not by commits
        result: Mapping[Any, int] = await self.call_thread(
            seek_back, self._ensure_consumer(), self.app.tables.changelog_topics
        )
        return result


class Consumer(driver.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._released: set[tuple[Any, int]] = set()  # (tp, offset) the worker acknowledges next

    def release(self, message: Any) -> None:
        """The worker's acknowledgement of `message` follows: let it count (hook 6)."""
        self._released.add((message.tp, message.offset))

    def ack(self, message: Any) -> bool:
        """Hook 6: an acknowledgement the worker did not release is not taken."""
        key = (message.tp, message.offset)
        if key not in self._released:
            return False
        self._released.discard(key)
        return bool(super().ack(message))

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        """Hook 5: faust's own guess, from a jump in the offsets it delivers, is not taken."""

    async def add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        """Offsets `offset_from`..`offset_to` (inclusive) of `tp` will never be delivered: faust's commit
        goes past them once the records around them are acknowledged."""
        await super()._add_gap(tp, offset_from, offset_to)

    def committed_offset(self, tp: Any) -> int | None:
        """Hook 3: the offset faust last committed or sought to for `tp`; None while a rebalance is under
        way (faust forgets it when partitions are revoked and learns it again when it seeks)."""
        found: int | None = self._committed_offset.get(tp)
        return found


class Transport(driver.Transport):
    Consumer = Consumer


class TableManager(tables.TableManager):
    async def on_start(self) -> None:
        # hook 4: faust's on_start without its `await self.sleep(1.0)` first
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def install(app: faust.App) -> None:
    """Give `app` the hooked transport; before anything (a topic, a table) makes faust build its own."""
    app.transport = Transport(app.conf.broker_consumer, app)


def consumer(app: faust.App) -> Consumer:
    found = app.consumer
    assert isinstance(found, Consumer), "faust_adapter.install(app) was not called"
    return found


def fetch_max_wait_ms(app: faust.App) -> int | None:
    """The fetch wait the running consumer's fetcher actually uses (None before it started): the worker
    logs it once, so a hook that stopped taking effect shows."""
    thread = getattr(app.consumer, "_thread", None)
    consumer = getattr(thread, "_consumer", None)
    fetcher = getattr(consumer, "_fetcher", None)
    value: int | None = getattr(fetcher, "_fetch_max_wait_ms", None)
    return value


def changelog_topics(app: faust.App) -> list[NewTopic]:
    """The changelog topics faust would create for the app's tables, with the same partitions and
    configuration (faust's aiokafka driver: compact/delete from the topic's flags, retention.ms), so the
    worker can create them before faust looks for them."""
    topics = []
    for table in app.tables.values():
        topic = table.changelog_topic
        config: dict[str, str] = {}
        policy = sorted(flag for flag, on in (("compact", topic.compacting), ("delete", topic.deleting)) if on)
        if policy:
            config["cleanup.policy"] = ",".join(policy)
        if topic.retention:
            config["retention.ms"] = str(int(want_seconds(topic.retention) * 1000))
        config.update({k: str(v) for k, v in (topic.config or {}).items()})
        topics.append(
            NewTopic(
                topic.get_topic_name(),
                topic.partitions or app.conf.topic_partitions,
                app.conf.topic_replication_factor,
                topic_configs=config,
            )
        )
    return topics
