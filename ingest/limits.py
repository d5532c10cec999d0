"""Per-agent rate limits, so one flooding agent is throttled while every other agent proceeds.

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
