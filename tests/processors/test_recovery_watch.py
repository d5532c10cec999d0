"""When a worker gives up on a table recovery that reads nothing (pure logic; the worker exits on it)."""

from __future__ import annotations

from processors.recovery_watch import RecoveryWatch


def test_a_recovery_that_reads_nothing_for_the_limit_is_stuck() -> None:
    watch = RecoveryWatch(limit_s=10.0)
    assert not watch.stuck(True, 49, now=100.0)
    assert not watch.stuck(True, 49, now=109.9)
    assert watch.stuck(True, 49, now=110.0)


def test_a_record_read_or_a_new_recovery_starts_the_count_again() -> None:
    watch = RecoveryWatch(limit_s=10.0)
    watch.stuck(True, 49, now=100.0)
    assert not watch.stuck(True, 30, now=108.0)  # read 19 records
    assert not watch.stuck(True, 30, now=117.0)
    assert watch.stuck(True, 30, now=118.0)
    assert not watch.stuck(False, 0, now=119.0)  # done
    assert not watch.stuck(True, 30, now=125.0)  # the next recovery counts from its own start
    assert not watch.stuck(True, 30, now=134.0)


def test_no_recovery_or_nothing_left_is_never_stuck() -> None:
    watch = RecoveryWatch(limit_s=1.0)
    for now in range(0, 100, 10):
        assert not watch.stuck(False, 49, now=float(now))  # not recovering (the counters are stale)
        assert not watch.stuck(True, 0, now=float(now))  # up to date, waiting for nothing
