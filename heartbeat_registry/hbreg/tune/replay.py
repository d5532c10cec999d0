"""One partition's `heartbeats` records through the workers' own judgement, once per parameter set.

Each record is folded into a `processors.partition.PartitionState` exactly as a worker folds it
(`PartitionState.fold`: its heartbeats, then its watermark) for the first parameter set, and judged by
the same `Liveness` code for every other set (`processors.partition.judge`, with the windows the fold
closed), so the replay runs the workers' rules on their pipeline clock; nothing of them is copied here.
Records before the period only warm the states up (the phi model's history, the agents' episodes);
stalls count when detected within it.

Labels come from the agents themselves, not from the rules: the client library numbers an agent's
heartbeats 1, 2, 3... in the memory of its process (`Heartbeat.seq`), so after a stall the agent's next
heartbeat tells
- **false**: it continues the count (the process never died; it was late),
- **true**: the count started again (a new process), or the agent never came back before the records
  end (`unresolved` too),
- **unlabelled**: the agent sends no seq.
A hung or overdue stall is labelled by the same rule: there it answers whether the process died, not
whether its task was stuck, which heartbeats cannot tell.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from heartbeat_registry.pb import hb
from processors.liveness import Liveness, Rules
from processors.partition import PartitionState, judge

FALSE, TRUE, UNLABELLED = "false", "true", "unlabelled"


@dataclasses.dataclass
class Stall:
    event_id: str
    agent_id: str
    reason: str
    last_seen_ms: int
    detected_at_ms: int
    seq: int  # the agent's seq at its last heartbeat before the stall (0: not counted)
    label: str = ""  # empty while waiting for the agent's next heartbeat
    unresolved: bool = False


def label(before: int, after: int) -> str:
    """The label of a stall whose agent's last seq was `before` and whose next heartbeat has `after`."""
    if not before or not after:
        return UNLABELLED
    return FALSE if after > before else TRUE


class PartitionReplay:
    def __init__(
        self,
        partition: int,
        rule_sets: list[Rules],
        window_ms: int,
        grace_ms: int,
        start_ms: int,
        end_ms: int,
        label_until_ms: int,
    ) -> None:
        """Stalls count when detected in [start_ms, end_ms]; heartbeats up to `label_until_ms` still
        label them (an agent that comes back just after the period was late, not dead)."""
        # the first set's state also keeps the windows; the others judge the same records with them
        self.state = PartitionState(partition, window_ms, rule_sets[0], grace_ms)
        self.others = [Liveness(partition, rules) for rules in rule_sets[1:]]
        self.stalls: list[list[Stall]] = [[] for _ in rule_sets]
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.label_until_ms = label_until_ms
        self.heartbeats = 0  # received within the period
        self.agents: set[str] = set()
        self._waiting: dict[str, list[Stall]] = {}  # agent -> its stalls waiting for its next heartbeat
        self._seq: dict[str, int] = {}  # agent -> seq of its newest heartbeat
        self._clock = 0

    def feed(self, cols: hb.HeartbeatColumns) -> bool:
        """Fold one record in; False once the records are past everything the replay needs."""
        agents = cols.agent_id
        seqs = cols.seq if len(cols.seq) == len(agents) else [0] * len(agents)
        waiting = self._waiting
        if waiting:
            for agent, seq in zip(agents, seqs, strict=True):
                pending = waiting.pop(agent, None)
                if pending:
                    for stall in pending:
                        stall.label = label(stall.seq, seq)
        self._seq.update(zip(agents, seqs, strict=True))
        if self._clock <= self.end_ms:
            self._judge(cols)
        self._clock = max(self._clock, cols.watermark_ms)
        return self._clock <= self.end_ms or (bool(waiting) and self._clock <= self.label_until_ms)

    def _judge(self, cols: hb.HeartbeatColumns) -> None:
        start, end = self.start_ms, self.end_ms
        received = cols.received_ms
        in_period: Sequence[str]
        if received and start <= min(received) and max(received) <= end:  # the common case: all of it
            in_period = cols.agent_id
        else:
            in_period = [a for a, r in zip(cols.agent_id, received, strict=True) if start <= r <= end]
        self.heartbeats += len(in_period)
        self.agents.update(in_period)
        state = self.state
        events, _ = state.fold(cols)
        closed = list(state.unpublished)
        state.forget_outputs()
        self._count(events, self.stalls[0])
        for liveness, stalls in zip(self.others, self.stalls[1:], strict=True):
            self._count(judge(liveness, cols, closed), stalls)

    def _count(self, events: list[hb.AgentEvent], stalls: list[Stall]) -> None:
        start, end = self.start_ms, self.end_ms
        for event in events:
            if event.type == hb.STALL and start <= event.detected_at_ms <= end:
                stall = Stall(
                    event.event_id,
                    event.agent_id,
                    event.reason,
                    event.last_seen_ms,
                    event.detected_at_ms,
                    self._seq.get(event.agent_id, 0),
                )
                stalls.append(stall)
                self._waiting.setdefault(event.agent_id, []).append(stall)

    def finish(self) -> list[list[Stall]]:
        """The stalls of each parameter set, labelled: an agent still silent when the records end never
        came back in the period."""
        for pending in self._waiting.values():
            for stall in pending:
                stall.label, stall.unresolved = TRUE, True
        self._waiting.clear()
        return self.stalls
