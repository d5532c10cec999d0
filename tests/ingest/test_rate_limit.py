"""The rate limiter as pure logic."""

from __future__ import annotations

from ingest.limits import RateLimiter


def test_burst_then_sustained_rate() -> None:
    limiter = RateLimiter(rate=10.0, burst=5.0)
    assert [limiter.allow("a", 100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert 99 <= limiter.retry_after_ms("a", 100.0) <= 101  # the next slot is 0.1 s away
    assert limiter.allow("a", 100.1) and not limiter.allow("a", 100.1)
    # sustained: one every 0.1 s is always allowed
    assert all(limiter.allow("a", 101.0 + i * 0.1) for i in range(50))


def test_agents_are_independent_and_quiet_ones_are_forgotten() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0)
    assert limiter.allow("a", 0.0) and not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert len(limiter) == 2
    limiter.sweep(0.5)  # too early: both are still ahead of their schedule
    assert len(limiter) == 2
    limiter.sweep(120.0)
    assert len(limiter) == 0  # memory follows the live fleet
    assert limiter.allow("a", 120.0) and not limiter.allow("a", 120.0)  # a fresh burst, the same limit
