"""How the services write to Kafka: acks=all, and idempotent where the broker allows it.

With acks=all the partition leader acknowledges a record only once every in-sync replica has it (at
least HBREG_KAFKA_MIN_INSYNC_REPLICAS of them), so an acknowledged record survives the loss of its
leader. Idempotence lets the broker drop a batch the producer sends again after an acknowledgement was
lost (a broker dying mid-request), so the retry does not write it twice; aiokafka keeps one request in
flight per broker, so it needs no `max.in.flight` limit to keep the order. Tansu, the light fallback
broker, answers the InitProducerId request idempotence needs with an error: there the producer runs
without it, after a warning, and a retried batch may come twice (the consumers are at-least-once anyway).
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

log = logging.getLogger(__name__)


async def start_producer(**config: Any) -> AIOKafkaProducer:
    """A started AIOKafkaProducer with `config` (any aiokafka producer argument but `acks`)."""
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **config)
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
        producer = AIOKafkaProducer(acks="all", **config)
        await producer.start()
    return producer
