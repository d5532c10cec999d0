"""faust's aiokafka transport, with a short fetch wait, a complete seek after a rebalance, and the
committed offsets readable (processors/partition.py `place()` needs them).

faust builds its consumer with `fetch_max_wait_ms=1500`: the broker holds a fetch that finds no data for
up to 1.5 s. faust pauses and resumes partitions around processing, and a record arriving for a partition
that was resumed while such a fetch was held waits for it: measured here as stalls of up to 1.5 s between
the bridge producing a record and the worker seeing it, which alone broke the 250 ms heartbeat-to-table
target. 100 ms bounds that wait; the price is more idle fetch round trips on a quiet topic.

After a rebalance faust seeks every partition back to its committed offset, so that records fetched but
not yet processed come again. A partition with nothing committed yet (a new consumer group, within its
first window) is left where the fetch had got to (aiokafka seeks only to committed offsets above 0): the
records faust discarded at the rebalance would never come. Those partitions go back to their beginning.

Registered as the faust transport `hbreg-kafka` (entry point `faust.transports` in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faust.transport.drivers import aiokafka as driver

FETCH_MAX_WAIT_MS = 100


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher
        return consumer

    async def seek_to_committed(self) -> Mapping[Any, int]:
        return await self.call_thread(self._seek_to_committed)

    async def _seek_to_committed(self) -> Mapping[Any, int]:
        consumer = self._ensure_consumer()
        committed = await consumer.seek_to_committed()
        # changelogs are positioned by faust's table recovery, not by commits (faust's own test for them)
        changelogs = self.app.tables.changelog_topics
        fresh = [tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs]
        if fresh:
            await consumer.seek_to_beginning(*fresh)
        return committed


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def committed_offset(self, tp: Any) -> int | None:
        """The offset faust last committed or sought to for `tp`; None while a rebalance is under way
        (faust forgets it when partitions are revoked and learns it again when it seeks)."""
        return self._committed_offset.get(tp)


class Transport(driver.Transport):
    Consumer = Consumer
