"""Notices a table recovery that reads nothing.

After a rebalance faust rebuilds the tables of the partitions a worker now owns by reading their
changelog partitions up to the end offsets it measured, and takes no record of any `heartbeats`
partition until that is done. A worker that was already running when the rebalance came can wait there
for good: faust seeks the changelog partitions back and resumes them, but the records never reach its
recovery ("No event received for active tp" in faust's log, every 5 s), and the worker folds in nothing,
publishes no clock and commits nothing. The chaos soak found it at its start, when the second worker
joined (2 of 33 one-minute runs of 2,000 agents: every stall on its partitions after it was missed).
Which of the drops of fetched records in faust's consumer takes them, its log does not say; a worker
started afresh reads the same changelogs in milliseconds. So a recovery that has records left and reads
none of them for `limit_s` is a reason to stop: the worker exits non-zero and its supervisor starts it
again, as after any failure that leaves its state in doubt. (A recovery also waits for good on a
changelog partition that ends in a transaction's marker, an offset no record is delivered at: how the
test makes one stick.)
"""

from __future__ import annotations

STUCK_S = 10.0  # a Kafka restart pauses a recovery for a few seconds; a stuck one waits for good
STUCK_ERROR = "table recovery read no changelog record"  # how the worker's exit says why


class RecoveryWatch:
    def __init__(self, limit_s: float = STUCK_S) -> None:
        self.limit_s = limit_s
        self._remaining: int | None = None
        self._since = 0.0

    def stuck(self, in_recovery: bool, remaining: int, now: float) -> bool:
        """True once a recovery with `remaining` changelog records still to read has read none of them for
        `limit_s` (`now`: monotonic seconds). A record read, or a new recovery (other end offsets), starts
        the count again."""
        if not in_recovery or remaining <= 0:
            self._remaining = None
            return False
        if remaining != self._remaining:
            self._remaining, self._since = remaining, now
            return False
        return now - self._since >= self.limit_s
