"""The Kafka topics the pipeline owns: created with the configured partitions before anyone uses them.

A process must not start on topics that are missing or misshapen: a consumer that subscribes before a
topic exists sees zero partitions, and faust then refuses its tables on every start (`PartitionsMismatch`)
without ever recovering. So `ensure_topics` creates what is missing, refuses a topic whose partition
count differs (repartitioning a live topic moves agents between workers and breaks their order), and
returns only once the broker's metadata lists every topic with all its partitions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from heartbeat_registry.core.names import Names
from heartbeat_registry.errors import ConfigError, ServiceError

log = logging.getLogger(__name__)

HEARTBEATS_RETENTION_MS = 6 * 3600 * 1000
EVENTS_RETENTION_MS = 7 * 24 * 3600 * 1000


def pipeline_topics(names: Names, partitions: int) -> list[NewTopic]:
    """`heartbeats` (the bridge's output) and `agent-events` (the workers' output)."""
    return [
        NewTopic(names.heartbeats_topic, partitions, 1, topic_configs={"retention.ms": str(HEARTBEATS_RETENTION_MS)}),
        NewTopic(names.events_topic, partitions, 1, topic_configs={"retention.ms": str(EVENTS_RETENTION_MS)}),
    ]


def reassignment_topics(names: Names, partitions: int) -> list[NewTopic]:
    """`task-reassignments` (the reassignment sink's output, keyed by task)."""
    return [
        NewTopic(names.reassignments_topic, partitions, 1, topic_configs={"retention.ms": str(EVENTS_RETENTION_MS)})
    ]


async def ensure_topics(bootstrap: str, topics: Sequence[NewTopic], timeout: float = 60.0) -> None:
    """Create the missing `topics`, check the partition counts of all, wait until the metadata has them.

    Waits for the broker for up to `timeout` seconds; a topic with another partition count is a
    ConfigError naming it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if await _create_and_check(bootstrap, topics):
                return
        except KafkaError as exc:
            if loop.time() > deadline:
                raise ServiceError(f"Kafka at {bootstrap} did not answer within {timeout:.0f} s: {exc!r}") from None
        if loop.time() > deadline:
            raise ServiceError(f"topics {', '.join(t.name for t in topics)} did not appear within {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def partition_count(bootstrap: str, topic: str) -> int:
    """How many partitions `topic` has (0 while it does not exist), asking the broker for that topic only."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        # describing a missing topic would create it on brokers with auto.create.topics.enable
        if topic not in await admin.list_topics():
            return 0
        found = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return next((len(d["partitions"]) for d in found if d["topic"] == topic and not d["error_code"]), 0)


async def _create_and_check(bootstrap: str, topics: Sequence[NewTopic]) -> bool:
    """Create what is missing; True once the broker's metadata lists every topic with all its partitions
    and their leaders (what a starting consumer or producer sees)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if missing:
            response = await admin.create_topics(missing)
            refused = [
                f"{name}: {message or f'error {code}'}"
                for name, code, *rest in getattr(response, "topic_errors", ())
                for message in [rest[0] if rest else None]
                if code not in (0, TopicAlreadyExistsError.errno)  # another process made it meanwhile: fine
            ]
            if refused:
                raise ServiceError("Kafka refused to create topics: " + "; ".join(refused))
            log.info("created topics", extra={"topics": ",".join(t.name for t in missing)})
            existing |= {t.name for t in missing}
        described = await admin.describe_topics([t.name for t in topics if t.name in existing])
        found = {d["topic"]: len(d["partitions"]) for d in described}
        # a partition without a leader yet refuses produce requests for a moment: wait for all of them
        led = {d["topic"] for d in described if all(p["leader"] >= 0 for p in d["partitions"])}
    finally:
        await admin.close()
    for topic in topics:
        count = found.get(topic.name, 0)
        if count and count != topic.num_partitions:
            raise ConfigError(
                f"Kafka topic {topic.name} has {count} partitions but {topic.num_partitions} are configured "
                f"(HBREG_TOPIC_PARTITIONS); use a new HBREG_TOPIC_PREFIX or recreate the topic"
            )
    return all(found.get(t.name) and t.name in led for t in topics)
