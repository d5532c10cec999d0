"""The recent `agent-events` the query API serves: the last day from Kafka, then live, kept in memory."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.events import HISTORY_MS, EventReader
from heartbeat_registry.core.shapes import event_json

log = logging.getLogger(__name__)
EVENT_MEMORY = 100_000


class EventLog:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_MEMORY)
        self.running = False  # caught up with the history and following
        self._next: dict[int, int] = {}  # partition -> next offset, to resume exactly after a failure
        self.appended = 0  # events appended so far (the deque drops the oldest): readers follow by it

    async def run(self) -> None:
        """Read until cancelled; a failure (Kafka gone) is logged and the reading starts over."""
        while True:
            try:
                await self._read()
            except Exception as exc:
                log.warning("reading agent-events failed; retrying", extra={"error": repr(exc)})
            self.running = False
            await asyncio.sleep(1.0)

    async def _read(self) -> None:
        async with EventReader(self._bootstrap, self._topic) as reader:
            await reader.seek(now_ms() - HISTORY_MS, offsets=self._next)
            self._append(await reader.history())
            self._next = await reader.positions()
            self.running = True
            while True:
                self._append(await reader.fetch())
                self._next = await reader.positions()

    def _append(self, events: list[Any]) -> None:
        self.events.extend(event_json(e) for e in events)
        self.appended += len(events)

    def select(self, kind: str | None, since: int, agent_id: str | None, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` events of that type, since then, concerning that agent: the last day's in time
        order, then in the order they arrived."""
        found = [
            e
            for e in self.events
            if (kind is None or e["type"] == kind)
            and e["detected_at_ms"] >= since
            and (agent_id is None or e["agent_id"] == agent_id or agent_id in e["agent_ids"])
        ]
        return found[-limit:] if limit else []
