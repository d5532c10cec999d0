"""The Kafka topics the pipeline owns: created with the configured partitions before anyone uses them.

A process must not start on topics that are missing or misshapen: a consumer that subscribes before a
topic exists sees zero partitions, and faust then refuses its tables on every start (`PartitionsMismatch`)
without ever recovering. So `ensure_topics` creates what is missing, refuses a topic whose partition
count differs (repartitioning a live topic moves agents between workers and breaks their order), and
returns only once the broker's metadata lists every topic with all its partitions.

Every topic is created with HBREG_KAFKA_REPLICATION_FACTOR replicas and HBREG_KAFKA_MIN_INSYNC_REPLICAS
as its `min.insync.replicas`: the producers write with acks=all, so an acknowledged record is on at
least that many brokers. An existing topic with another replica count is only warned about, unlike a
partition mismatch: it routes every agent exactly as configured, and changing its replicas is a partition
reassignment an operator runs on the live topic (`kafka-reassign-partitions`), not something to refuse
start-up over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import InvalidReplicationFactorError, KafkaError, TopicAlreadyExistsError

from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.errors import ConfigError, ServiceError

log = logging.getLogger(__name__)

HEARTBEATS_RETENTION_MS = 6 * 3600 * 1000
EVENTS_RETENTION_MS = 7 * 24 * 3600 * 1000


@dataclasses.dataclass(frozen=True)
class Replication:
    """How many brokers hold each partition, and how many must have a record before it is acknowledged."""

    replicas: int = 1
    min_insync: int = 1

    @classmethod
    def of(cls, settings: Settings) -> Replication:
        return cls(settings.kafka_replication_factor, settings.kafka_min_insync_replicas)

    @property
    def configs(self) -> dict[str, str]:
        """The topic configuration that goes with it (every topic the registry creates carries it)."""
        return {"min.insync.replicas": str(self.min_insync)}


SINGLE = Replication()


def pipeline_topics(names: Names, partitions: int, replication: Replication = SINGLE) -> list[NewTopic]:
    """`heartbeats` (the bridge's output) and `agent-events` (the workers' output)."""
    return [
        _topic(names.heartbeats_topic, partitions, replication, HEARTBEATS_RETENTION_MS),
        _topic(names.events_topic, partitions, replication, EVENTS_RETENTION_MS),
    ]


def reassignment_topics(names: Names, partitions: int, replication: Replication = SINGLE) -> list[NewTopic]:
    """`task-reassignments` (the reassignment sink's output, keyed by task)."""
    return [_topic(names.reassignments_topic, partitions, replication, EVENTS_RETENTION_MS)]


def _topic(name: str, partitions: int, replication: Replication, retention_ms: int) -> NewTopic:
    configs = {"retention.ms": str(retention_ms), **replication.configs}
    return NewTopic(name, partitions, replication.replicas, topic_configs=configs)


async def ensure_topics(bootstrap: str, topics: Sequence[NewTopic], timeout: float = 60.0) -> None:
    """Create the missing `topics`, check the partition counts of all, wait until the metadata has them.

    Waits for the broker for up to `timeout` seconds; a topic with another partition count is a
    ConfigError naming it, one with another replica count a warning naming it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            replicas = await _create_and_check(bootstrap, topics)
            if replicas is not None:
                _warn_replicas(topics, replicas)
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


async def _create_and_check(bootstrap: str, topics: Sequence[NewTopic]) -> dict[str, int] | None:
    """Create what is missing; once the broker's metadata lists every topic with all its partitions and
    their leaders (what a starting consumer or producer sees), each topic's replica count, else None."""
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
            too_few = [
                rest[0] if rest and rest[0] else "INVALID_REPLICATION_FACTOR"
                for _, code, *rest in getattr(response, "topic_errors", ())
                if code == InvalidReplicationFactorError.errno
            ]
            if too_few:
                wanted = max(t.replication_factor for t in missing)
                raise ConfigError(
                    f"HBREG_KAFKA_REPLICATION_FACTOR={wanted} is more than the brokers Kafka at {bootstrap} has: "
                    + too_few[0]
                )
            if refused:
                raise ServiceError("Kafka refused to create topics: " + "; ".join(refused))
            log.info("created topics", extra={"topics": ",".join(t.name for t in missing)})
            existing |= {t.name for t in missing}
        described = await admin.describe_topics([t.name for t in topics if t.name in existing])
        found = {d["topic"]: len(d["partitions"]) for d in described}
        replicas = {d["topic"]: min(len(p["replicas"]) for p in d["partitions"]) for d in described if d["partitions"]}
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
    return replicas if all(found.get(t.name) and t.name in led for t in topics) else None


def _warn_replicas(topics: Sequence[NewTopic], replicas: dict[str, int]) -> None:
    for topic in topics:
        count = replicas.get(topic.name, topic.replication_factor)
        if count != topic.replication_factor:
            log.warning(
                "topic has another replica count than configured (HBREG_KAFKA_REPLICATION_FACTOR); used as it "
                "is: change it with a partition reassignment",
                extra={"topic": topic.name, "replicas": count, "configured": topic.replication_factor},
            )
