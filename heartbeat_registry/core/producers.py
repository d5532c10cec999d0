"""How the services write to Kafka: acks=all, and idempotent where the broker allows it.

With acks=all the partition leader acknowledges a record only once every in-sync replica has it (at
least HBREG_KAFKA_MIN_INSYNC_REPLICAS of them), so an acknowledged record survives the loss of its
leader. Idempotence lets the broker drop a batch the producer sends again after an acknowledgement was
lost (a broker dying mid-request), so the retry does not write it twice; aiokafka keeps one request in
flight per broker, so it needs no `max.in.flight` limit to keep the order. Tansu, the light fallback
broker, answers the InitProducerId request idempotence needs with an error: there the producer runs
without it, after a warning, and a retried batch may come twice (the consumers are at-least-once anyway).

Every producer also waits `retry_backoff_ms` after a failed metadata update (`pace_metadata_updates`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

log = logging.getLogger(__name__)


def pace_metadata_updates(producer: AIOKafkaProducer, backoff_ms: int = 100) -> AIOKafkaProducer:
    """A failed metadata update holds its waiters `backoff_ms` (aiokafka's `retry_backoff_ms`) before they
    ask again. aiokafka's sender asks for new metadata the moment an update fails while a partition has
    no leader, which is the whole time a broker is down or restarting: about 1,000 connection attempts
    a second per producer (the chaos soak: 26,000 per bridge in 30 minutes, and the bridges' CPU up by
    half during each Kafka restart, taken from the ingest on a shared machine). Kafka's own clients
    back off there; aiokafka's fetcher has the same gap (aio-libs/aiokafka#1155). In a producer the
    client's synchronizer task is the one caller of `_metadata_update`, so pausing there paces every
    waiter at once."""
    client = producer.client
    update = client._metadata_update

    async def paced(cluster: Any, topics: Any) -> bool:
        ok: bool = await update(cluster, topics)
        if not ok:
            await asyncio.sleep(backoff_ms / 1000)
        return ok

    client._metadata_update = paced
    return producer


async def start_producer(**config: Any) -> AIOKafkaProducer:
    """A started AIOKafkaProducer with `config` (any aiokafka producer argument but `acks`)."""
    backoff_ms = config.get("retry_backoff_ms", 100)
    producer = pace_metadata_updates(AIOKafkaProducer(acks="all", enable_idempotence=True, **config), backoff_ms)
    try:
        await producer.start()
    except KafkaConnectionError:
        await producer.stop()
        raise
    except KafkaError as exc:  # the broker refused a producer id: no idempotent producers there
        await producer.stop()
        log.warning(
            "the broker refused an idempotent producer: writing without idempotence (a batch retried "
            "after a lost acknowledgement may be written twice)",
            extra={"error": repr(exc)},
        )
        producer = pace_metadata_updates(AIOKafkaProducer(acks="all", **config), backoff_ms)
        await producer.start()
    return producer
