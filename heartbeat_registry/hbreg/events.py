"""`hbreg events`: the `agent-events` topic on a terminal. Without `--follow` it prints the last day's
events in time order and exits; with it, it then keeps printing new ones as they come."""

from __future__ import annotations

import json
import time

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.events import HISTORY_MS, EventReader
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.shapes import event_json
from heartbeat_registry.pb import hb


def _line(event: hb.AgentEvent, as_json: bool) -> str:
    shown = event_json(event)
    if as_json:
        return json.dumps(shown)
    at = time.strftime("%H:%M:%S", time.localtime(shown["detected_at_ms"] / 1000))
    return (
        f"{at} {shown['type']:<9} agent={shown['agent_id'] or '-'} task={shown['task_id'] or '-'} "
        f"reason={shown['reason'] or '-'} last_seen_ms={shown['last_seen_ms']}"
    )


async def print_events(settings: Settings, follow: bool, as_json: bool) -> None:
    assert settings.kafka_bootstrap is not None
    async with EventReader(settings.kafka_bootstrap, Names.of(settings).events_topic) as reader:
        if not await reader.seek(now_ms() - HISTORY_MS, wait=follow):
            return  # no events yet: the topic appears with the first worker
        for event in await reader.history():
            print(_line(event, as_json), flush=True)
        while follow:
            for event in await reader.fetch():
                print(_line(event, as_json), flush=True)
