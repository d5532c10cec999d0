"""Reading the `agent-events` topic: what `hbreg events` prints."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from heartbeat_registry.names import Names
from heartbeat_registry.pb import hb
from heartbeat_registry.settings import Settings
from heartbeat_registry.shapes import event_json


def _human(event: dict) -> str:
    at = time.strftime("%H:%M:%S", time.localtime(event["detected_at_ms"] / 1000))
    return (
        f"{at} {event['type']:<9} agent={event['agent_id'] or '-'} task={event['task_id'] or '-'} "
        f"reason={event['reason'] or '-'} last_seen_ms={event['last_seen_ms']}"
    )


async def print_events(settings: Settings, follow: bool, as_json: bool) -> None:
    """Print every event from the beginning of the topic; with `follow`, keep printing new ones."""
    from aiokafka import AIOKafkaConsumer

    topic = Names.of(settings).events_topic
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        while topic not in await consumer.topics():  # the worker may create it moments from now
            if not follow:
                return
            await asyncio.sleep(1.0)
        consumer.subscribe([topic])
        end = None
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    event = event_json(hb.AgentEvent.FromString(record.value))
                    print(json.dumps(event) if as_json else _human(event), flush=True)
            if follow or not consumer.assignment():
                continue
            if end is None:
                end = await consumer.end_offsets(list(consumer.assignment()))
            if all(await consumer.position(tp) >= offset for tp, offset in end.items()):
                return
    finally:
        await consumer.stop()
        sys.stdout.flush()
