"""The live-updates loop of the query API stops when cancelled, also when a page opens at that moment.

asyncio.wait_for on Python 3.11 returns the result instead of raising when the awaited thing finished
just as the task was cancelled: the loop went on forever and the query API's stop waited on it (found in
CI: the browser test hung in `QueryServer.stop` for 300 s)."""

from __future__ import annotations

import asyncio
from typing import Any

from sinks.web.live import Live


async def test_the_loop_stops_when_cancelled_as_a_page_opens() -> None:
    # no query store, event log or health: every tick fails, is logged, and the loop goes on (what it does
    # while Redis is away), so only its pause decides when it can be cancelled
    none: Any = None
    hung = []
    for turns in range(6):  # the page opens 0..5 loop turns before the cancel: one of them hits the race
        live = Live(none, none, none)
        task = asyncio.create_task(live.run())
        await asyncio.sleep(0.02)
        live.subscribe()  # sets the event the loop's pause waits on
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            hung.append(turns)
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
    assert hung == [], f"still running after a cancel, page opened {hung} turns before it"
