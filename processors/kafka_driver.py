"""faust's aiokafka transport, with a short fetch wait for the worker's consumer.

faust builds its consumer with `fetch_max_wait_ms=1500`: the broker holds a fetch that finds no data for
up to 1.5 s. faust pauses and resumes partitions around processing, and a record arriving for a partition
that was resumed while such a fetch was held waits for it: measured here as stalls of up to 1.5 s between
the bridge producing a record and the worker seeing it, which alone broke the 250 ms heartbeat-to-table
target. 100 ms bounds that wait; the price is more idle fetch round trips on a quiet topic.

Registered as the faust transport `hbreg-kafka` (entry point `faust.transports` in pyproject.toml).
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as driver

FETCH_MAX_WAIT_MS = 100


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer
