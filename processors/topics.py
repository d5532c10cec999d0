"""Creates the Kafka topics the pipeline owns, with the configured partition count (idempotent)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from heartbeat_registry.names import Names

log = logging.getLogger(__name__)

HEARTBEATS_RETENTION_MS = 6 * 3600 * 1000
EVENTS_RETENTION_MS = 7 * 24 * 3600 * 1000


async def ensure_topics(bootstrap: str, names: Names, partitions: int, timeout: float = 60.0) -> None:
    """Create `heartbeats` and `agent-events`; waits for the broker for up to `timeout` seconds."""
    topics = [
        NewTopic(names.heartbeats_topic, partitions, 1, topic_configs={"retention.ms": str(HEARTBEATS_RETENTION_MS)}),
        NewTopic(names.events_topic, partitions, 1, topic_configs={"retention.ms": str(EVENTS_RETENTION_MS)}),
    ]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in topics if t.name not in existing]
            if missing:
                try:
                    await admin.create_topics(missing)
                except TopicAlreadyExistsError:
                    pass
                log.info("created topics", extra={"topics": ",".join(t.name for t in missing)})
            return
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
