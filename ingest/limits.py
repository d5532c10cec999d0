"""Rate limits: per agent, so one flooding agent is throttled while every other agent proceeds; and on new
streams, so a fleet reconnecting at once is taken on at a pace the ingest can serve.

GCRA (the generic cell rate algorithm, a token bucket kept as one number): per agent only the
"theoretical arrival time" of its next heartbeat is stored, which makes a check one dict read and one
write on the hot path. Agents that went quiet are dropped, so memory follows the live fleet.
"""

from __future__ import annotations

import time

_SWEEP_EVERY_S = 60.0


class RateLimiter:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._interval = 1.0 / rate
        # how far ahead of schedule an agent may run (plus a hair, so float rounding never refuses an
        # agent that is exactly on schedule)
        self._tolerance = (self.burst - 1.0) * self._interval + 1e-9
        self._tat: dict[str, float] = {}  # agent -> theoretical arrival time (monotonic s)
        self._swept = float("-inf")

    def __len__(self) -> int:
        """Agents currently tracked (those not quiet since the last sweep)."""
        return len(self._tat)

    def allow(self, agent_id: str, now: float) -> bool:
        """Count one heartbeat of `agent_id`; False (and not counted) when it is over its limit."""
        tat = self._tat.get(agent_id, now)
        if tat < now:
            tat = now
        if tat - now > self._tolerance:
            return False
        self._tat[agent_id] = tat + self._interval
        return True

    def refund(self, agent_id: str) -> None:
        """Uncount one heartbeat `allow` counted (its request was refused whole: nothing was stored)."""
        tat = self._tat.get(agent_id)
        if tat is not None:
            self._tat[agent_id] = tat - self._interval

    def retry_after_ms(self, agent_id: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        wait = self._tat.get(agent_id, now) - now - self._tolerance
        return max(1, int(wait * 1000) + 1)

    def sweep(self, now: float) -> None:
        """Forget agents whose schedule lies in the past (they have been quiet)."""
        if now - self._swept < _SWEEP_EVERY_S:
            return
        self._swept = now
        self._tat = {a: t for a, t in self._tat.items() if t > now}


class StreamAdmission:
    """New BeatStreams per second one ingest process takes on. After an ingest restart its whole fleet
    reconnects within seconds; taking every stream at once would leave the process answering none of
    them in time (and grpc.aio takes one new call per turn of its event loop, so the queue of calls not
    yet taken grows with every busy turn). The streams already open are never refused for this.

    The same GCRA as above, over all new streams. A stream over the pace is refused with a pushback
    that promises the following free slots in turn: the n-th stream refused in a crowd is told to come
    back n intervals after the first, so a crowd of 20,000 returns spread evenly over 20,000 / rate
    seconds instead of all at once (the client adds its own jitter on top)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self._interval = 1.0 / rate
        self._tolerance = (max(burst, 1.0) - 1.0) * self._interval + 1e-9
        self._tat = float("-inf")  # theoretical arrival time of the next new stream (monotonic s)
        self._promised = float("-inf")  # the latest slot promised to a refused stream

    def admit(self, now: float) -> int:
        """0 to take the new stream on, else the milliseconds after which it should come back."""
        tat = self._tat if self._tat > now else now
        if tat - now <= self._tolerance:
            self._tat = tat + self._interval
            return 0
        slot = max(self._promised + self._interval, tat - self._tolerance)
        self._promised = slot
        return int((slot - now) * 1000) + 1
