"""Shard stream entries written by someone else than the ingest, between genuine ones: the bridge counts
them, acknowledges them, forwards none of their bytes to Kafka, and goes on forwarding the heartbeats
written after them (real Valkey, real Kafka, the ingest in-process)."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import grpc
import pytest
from prometheus_client import REGISTRY

from heartbeat_registry.core import redis_client
from heartbeat_registry.core.columns import COLUMNS
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb, hb_grpc
from ingest.server import Ingest
from tests.kafka_helpers import eventually, read_records
from tests.processors.test_bridge import batch, delivered, run_bridge

pytestmark = pytest.mark.kafka

FOREIGN = "someone-else"  # the agent of every foreign entry that parses at all
ONE_BEAT = hb.HeartbeatColumns(
    agent_id=[FOREIGN],
    task_id=["t"],
    status=[hb.RUNNING],
    timestamp=[1],
    cpu_util=[0.5],
    progress=[math.nan],
    received_ms=[1],
    seq=[1],
)
# (what it is, the entry's fields): each one on every shard stream, among the ingest's entries
POISON: list[tuple[str, dict[str, bytes | str]]] = [
    ("no field b", {"x": "not from the ingest"}),
    ("b is no protobuf", {"b": b"\xff\xfe\xfd not a protobuf", "n": "1", "r": "1"}),
    ("b is cut short", {"b": ONE_BEAT.SerializeToString()[:-3], "n": "1", "r": "1"}),
    # merged with the ingest's entries, its columns would pair agents with other agents' figures
    ("b has ragged columns", {"b": hb.HeartbeatColumns(agent_id=[FOREIGN], timestamp=[1]).SerializeToString()}),
    ("n and r are no numbers", {"b": ONE_BEAT.SerializeToString(), "n": "one", "r": "soon"}),
]


def skipped() -> float:
    return REGISTRY.get_sample_value("hbreg_bridge_undecodable_entries_total") or 0.0


@pytest.mark.parametrize("shards", [4, 3])  # forwarded as they are (shards = partitions), or decoded and split
async def test_foreign_entries_are_counted_acknowledged_and_skipped(pipeline_settings: Settings, shards: int) -> None:
    settings = dataclasses.replace(pipeline_settings, stream_shards=shards)
    names = Names.of(settings)
    client = redis_client.connect(settings)
    ingest = Ingest(settings)
    await ingest.start()
    stop = asyncio.Event()
    bridge = await run_bridge(settings, stop)
    before = skipped()
    try:
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            await stub.BeatBatch(batch(1, 500))
            for stream in names.streams():  # foreign entries between the ingest's, on every shard
                for _, fields in POISON:
                    await client.xadd(stream, fields)
            await stub.BeatBatch(batch(501, 500))
            await asyncio.sleep(0.5)  # a bridge cycle or more: the entries above were read and handled
            await stub.BeatBatch(batch(1001, 500))  # the positive control: forwarding goes on after them
        records = await read_records(
            settings.kafka_bootstrap, names.heartbeats_topic, lambda rs: len(delivered(rs)) >= 1500
        )

        async def nothing_pending() -> bool:
            return all([(await client.xpending(s, names.bridge_group))["pending"] == 0 for s in names.streams()])

        await eventually(nothing_pending, timeout=10)
        assert bridge.healthy and not bridge.task.done()
    finally:
        stop.set()
        await bridge.task
        await ingest.stop()
        await client.aclose()
    counts = delivered(records)  # every record decodes: no foreign bytes were merged into one
    assert set(counts) == set(range(1, 1501)), "a genuine heartbeat never reached Kafka"
    assert all(aligned(r.value) for r in records), "a record pairs agents with other agents' figures"
    assert FOREIGN not in {a for r in records for a in hb.HeartbeatColumns.FromString(r.value).agent_id}
    assert skipped() - before == len(POISON) * shards


def aligned(value: bytes) -> bool:
    """All columns of the record of one length, as the workers zip them."""
    cols = hb.HeartbeatColumns.FromString(value)
    return len({len(getattr(cols, name)) for name in COLUMNS}) == 1
