"""Producers pause after a failed metadata update instead of asking again at once."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaProducer

from heartbeat_registry.core.producers import pace_metadata_updates
from heartbeat_registry.hbreg import services


async def _updates_in(producer: AIOKafkaProducer, seconds: float) -> int:
    """How many metadata updates the producer's client makes in `seconds` when each one fails, asked as
    aiokafka's sender asks while a partition has no leader: again as soon as the last one ended."""
    client = producer.client
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not await client._metadata_update(client.cluster, set())  # nothing there: it fails
        count += 1
    return count


async def test_a_failed_metadata_update_waits_the_retry_backoff() -> None:
    nowhere = f"127.0.0.1:{services.free_port()}"  # no broker known and none listening: every update fails
    unpaced = AIOKafkaProducer(bootstrap_servers=nowhere)
    paced = pace_metadata_updates(AIOKafkaProducer(bootstrap_servers=nowhere), backoff_ms=100)
    assert await _updates_in(unpaced, 0.5) > 100  # the positive control: aiokafka alone spins
    assert await _updates_in(paced, 0.5) <= 6
