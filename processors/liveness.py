"""Liveness of the agents of one partition, judged on the pipeline's clock (the watermark).

Pure logic, no faust: `beat()` for every heartbeat, `advance()` when the watermark moves, `window_closed()`
for the progress rules. Deadlines sit in a wheel of 50 ms buckets, so a beat costs a couple of set
operations and a watermark step touches only the agents whose deadline passed, whatever the fleet size.

Rules:
- silent: no heartbeat for min(hard timeout, the phi-accrual deadline). The phi-accrual detector (as in
  Akka and Cassandra) models an agent's inter-arrival times as a normal distribution over a bounded
  history, widened by an acceptable pause and a minimum standard deviation; phi is monotonic in the
  silence, so the moment it crosses the threshold is computed once per beat and scheduled.
- hung: RUNNING with CPU below a threshold for a whole window.
- overdue: RUNNING the same task longer than the allowed maximum.
- An agent that left on purpose (STOPPING, or COMPLETED) is never stalled by its silence.
- Recovery needs `recovery_beats` healthy beats in a row (hysteresis: one late beat does not flap);
  meanwhile the agent is `recovered`, and silence sends it back to `stalled` within the same episode.
- Our outages: when the pipeline clock stands still longer than `gap_ms` and then jumps (Redis was
  down, so nothing could be stored and the bridges could not read), the silence was ours, not the
  agents': every agent heard since the previous such gap gets one full deadline from the gap's end,
  time for the clients to reconnect. Once per gap and only for agents heard since the last one, so a
  dead agent's stall is late by one deadline at most, however often the clock jumps (a slow link
  whose every step is long).
- Mass silence: when more than a fraction of a partition's agents fall silent together, that is an outage
  (a network partition, or ours): one `mass_silence` event, the agents are held without individual stalls
  (so nothing is reassigned) until they are confirmed one by one: when most of them are back, or the hold
  expires, whoever is still silent gets an individual stall.

An episode is identified by the agent's last beat before it stalled: exactly one stall and one recovery
event per episode, and replaying heartbeats already reflected in the state (after a restart) changes
nothing.

A heartbeat stored twice counts once (`Agent.repeated()`): the client sends an unanswered beat again, whole,
to the next ingest, and the first ingest may have stored it too; the copy has the same (seq, agent
timestamp) as one of the agent's last two heartbeats. One limit: a copy in a later window than its
original, replayed after a restart that lost that pair, counts in both windows.
"""

from __future__ import annotations

import array
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.views import ALIVE, LEFT, RECOVERED, STALLED, phi, phi_at, reported_state
from heartbeat_registry.pb import hb

BUCKET_MS = 50
HISTORY = 64  # inter-arrival samples kept per agent
MIN_SAMPLES = 5  # below this, only the hard timeout applies
_LEAVING = (hb.STOPPING, hb.COMPLETED)


@dataclasses.dataclass(frozen=True)
class Rules:
    timeout_ms: int
    phi_threshold: float = 8.0
    phi_suspect: float = 3.0
    acceptable_pause_ms: int = 3000
    min_std_ms: int = 100
    recovery_beats: int = 3
    hung_cpu: float = 0.02
    max_task_ms: int = 3600_000
    mass_fraction: float = 0.5
    mass_min: int = 10
    mass_hold_ms: int = 60_000
    # A pipeline clock step longer than this (the workers use HBREG_LAG_ALERT, the `pipeline_lag`
    # threshold) was an outage of ours; 0: no step counts as one (see Liveness.advance).
    gap_ms: int = 0


def rules_of(settings: Settings) -> Rules:
    """The rules the `HBREG_*` settings name (the workers' and `hbreg tune`'s, so they never differ)."""
    return Rules(
        timeout_ms=int(settings.stall_timeout * 1000),
        phi_threshold=settings.phi_threshold,
        phi_suspect=settings.phi_suspect,
        acceptable_pause_ms=int(settings.acceptable_pause * 1000),
        min_std_ms=int(settings.min_std * 1000),
        recovery_beats=settings.recovery_beats,
        hung_cpu=settings.hung_cpu,
        max_task_ms=int(settings.max_task_duration * 1000),
        mass_fraction=settings.mass_silence_fraction,
        mass_min=settings.mass_silence_min,
        mass_hold_ms=int(settings.mass_silence_hold * 1000),
        gap_ms=int(settings.lag_alert * 1000),
    )


def _y_for_phi(threshold: float) -> float:
    """The standardised distance y at which Akka's phi approximation reaches `threshold`."""
    q = 10.0**-threshold
    target = -math.log(q / (1.0 - q))
    low, high = 0.0, 100.0
    for _ in range(100):
        mid = (low + high) / 2
        if mid * (1.5976 + 0.070566 * mid * mid) < target:
            low = mid
        else:
            high = mid
    return high


class Agent:
    __slots__ = (
        "agent_id",
        "task_id",
        "status",
        "cpu",
        "last_seen",
        "task_started",
        "state",
        "reason",
        "episode",
        "since",
        "streak",
        "held",
        "deadline",
        "bucket",
        "hist",
        "hist_n",
        "hist_i",
        "hsum",
        "hsq",
        "seq",
        "sent",
        "seq0",
        "sent0",
    )

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.task_id = ""
        self.status = 0
        self.cpu = 0.0
        self.last_seen = 0
        self.task_started = 0  # receive time of the first RUNNING beat of the current task
        self.state = ALIVE
        self.reason = ""  # why it is stalled
        self.episode = 0  # last_seen when the stall episode began (0: none)
        self.since = 0  # when the current state began (pipeline time)
        self.streak = 0  # healthy beats in a row while recovering
        self.held = 0  # pipeline time of the mass silence holding it (0: not held)
        self.deadline = 0
        self.bucket = -1
        self.hist = array.array("f", bytes(4 * HISTORY))
        self.hist_n = 0
        self.hist_i = 0
        self.hsum = 0.0
        self.hsq = 0.0
        # Heartbeat.seq and .timestamp (agent clock) of the last heartbeat folded in, and of the one before
        # (a copy stored late, after the next beat). Not in the snapshot: the records replayed after a
        # restore must all count again in the windows they rebuild.
        self.seq = self.sent = self.seq0 = self.sent0 = 0

    def repeated(self, seq: int, sent: int) -> bool:
        """This heartbeat was one of the last two folded in (the same seq and agent timestamp; seq 0: not
        numbered): the client sent it again to another ingest when the first did not answer, and both
        stored it. Exact pairs, not "not newer": a restarted agent numbers from 1 again, possibly on a
        clock still behind (a host that booted before its clock was synchronised)."""
        return seq > 0 and ((seq == self.seq and sent == self.sent) or (seq == self.seq0 and sent == self.sent0))

    def add_interval(self, interval: float) -> None:
        if self.hist_n == HISTORY:
            old = self.hist[self.hist_i]
            self.hsum -= old
            self.hsq -= old * old
        else:
            self.hist_n += 1
        self.hist[self.hist_i] = interval
        self.hist_i = (self.hist_i + 1) % HISTORY
        self.hsum += interval
        self.hsq += interval * interval

    def stats(self, rules: Rules) -> tuple[float, float] | None:
        """(mean, std) of the phi model in ms, or None while the history is too short."""
        n = self.hist_n
        if n < MIN_SAMPLES:
            return None
        mean = self.hsum / n
        var = max(0.0, self.hsq / n - mean * mean)
        return mean + rules.acceptable_pause_ms, max(math.sqrt(var), rules.min_std_ms)

    def dump(self) -> list[Any]:
        n = self.hist_n
        mean = self.hsum / n if n else 0.0
        var = max(0.0, self.hsq / n - mean * mean) if n else 0.0
        return [
            self.task_id,
            self.status,
            self.cpu,
            self.last_seen,
            self.task_started,
            self.state,
            self.reason,
            self.episode,
            self.since,
            self.streak,
            self.held,
            n,
            mean,
            var,
        ]

    @classmethod
    def load(cls, agent_id: str, data: list[Any]) -> Agent:
        agent = cls(agent_id)
        (
            agent.task_id,
            agent.status,
            agent.cpu,
            agent.last_seen,
            agent.task_started,
            agent.state,
            agent.reason,
            agent.episode,
            agent.since,
            agent.streak,
            agent.held,
            n,
            mean,
            var,
        ) = data
        # the history itself is not kept: its summary seeds an equivalent one
        spread = math.sqrt(var)
        for i in range(min(n, HISTORY)):
            agent.add_interval(mean + (spread if i % 2 else -spread))
        return agent


class Liveness:
    def __init__(self, partition: int, rules: Rules) -> None:
        self.partition = partition
        self.rules = rules
        self.agents: dict[str, Agent] = {}
        self.watermark = 0
        self.mass: dict[int, set[str]] = {}  # mass silence (pipeline time it began) -> agents still held
        # agents whose state, task or episode changed since the caller last took this set; last_seen
        # alone does not count (it changes every beat, and window rows keep it durable)
        self.changed: set[str] = set()
        self._mass_back: dict[int, int] = {}  # how many of that cohort came back
        self._wheel: dict[int, set[str]] = {}
        self._next_bucket = -1
        self._y_stall = _y_for_phi(rules.phi_threshold)
        # set when records were skipped: the next watermark gives every agent a full deadline from there
        self.blind = False
        self.gap_end = 0  # pipeline time at the end of the last gap (Rules.gap_ms)

    # --- persistence --------------------------------------------------------------------------

    def restore(
        self,
        agents: Iterable[Agent],
        watermark: int,
        mass: dict[int, list[str]],
        seen: dict[str, int],
        gap_end: int = 0,
    ) -> None:
        """`seen`: newer last beats than the snapshot knows (from the closed window rows); `gap_end`: the
        snapshot's, so the agents a recent gap deferred keep their deadline."""
        self.watermark = watermark
        self.gap_end = gap_end
        for agent in agents:
            agent.last_seen = max(agent.last_seen, seen.get(agent.agent_id, 0))
            self.agents[agent.agent_id] = agent
            if agent.state in (ALIVE, RECOVERED) and agent.status not in _LEAVING:
                self._schedule(agent, max(agent.last_seen, gap_end) + self._offset(agent))
        self.mass = {int(k): set(v) for k, v in mass.items()}
        self._mass_back = {k: 0 for k in self.mass}

    # --- inputs -------------------------------------------------------------------------------

    def beat(
        self, agent_id: str, task_id: str, status: int, cpu: float, received: int, seq: int = 0, sent: int = 0
    ) -> hb.AgentEvent | None:
        """Update the agent; returns a recovery or overdue-stall event when one is due. `seq` and `sent`:
        the heartbeat's own, for `Agent.repeated()`."""
        agent = self.agents.get(agent_id)
        if agent is None:
            agent = self.agents[agent_id] = Agent(agent_id)
            agent.since = received
            self.changed.add(agent_id)
        if seq:
            agent.seq0, agent.sent0, agent.seq, agent.sent = agent.seq, agent.sent, seq, sent
        if received <= agent.last_seen:
            return None  # replayed or out of order: already reflected
        rules = self.rules
        if agent.last_seen:
            interval = received - agent.last_seen
            if interval < rules.timeout_ms:  # an outage is no sample of the beat rhythm
                agent.add_interval(interval)
        if task_id != agent.task_id or status != agent.status:
            self.changed.add(agent_id)
            if status == hb.RUNNING:
                agent.task_started = received
        if status != hb.RUNNING:
            agent.task_started = 0
        elif not agent.task_started:
            agent.task_started = received
        agent.last_seen, agent.task_id, agent.status, agent.cpu = received, task_id, status, cpu
        event = None
        if status in _LEAVING:
            if agent.state in (STALLED, RECOVERED) and not agent.held:
                event = self._recover(agent, received, "left")  # came back only to leave
            self._release(agent)
            self._set(agent, LEFT, received)
            self._unschedule(agent)
            return event
        if agent.held:
            self._release(agent)  # back during a mass silence: it was never individually stalled
            self._set(agent, ALIVE, received)
        elif agent.state in (STALLED, RECOVERED):
            agent.streak = agent.streak + 1 if self._healthy(agent) else 0
            if agent.streak >= rules.recovery_beats:
                event = self._recover(agent, received, agent.reason or "silent")
            else:
                self._set(agent, RECOVERED if agent.streak else STALLED, received)
        elif agent.state != ALIVE:
            self._set(agent, ALIVE, received)
        if (
            event is None
            and agent.state == ALIVE
            and status == hb.RUNNING
            and received - agent.task_started > rules.max_task_ms
        ):
            event = self._stall(
                agent,
                "overdue",
                received,
                {
                    "running_s": (received - agent.task_started) / 1000,
                    "max_task_s": rules.max_task_ms / 1000,
                },
            )
        self._schedule(agent, received + self._offset(agent))
        return event

    def advance(self, watermark: int) -> list[hb.AgentEvent]:
        """Move the pipeline clock: stall and mass-silence events for the deadlines that passed."""
        if watermark <= self.watermark:
            return []
        if self.blind:
            self.blind = False
            self._defer_deadlines(watermark)
        elif self.rules.gap_ms and self.watermark and watermark - self.watermark > self.rules.gap_ms:
            self._defer_deadlines(watermark, heard_since=self.gap_end)
            self.gap_end = watermark
        self.watermark = watermark
        due = self._pop_due(watermark)
        events: list[hb.AgentEvent] = []
        silent = []
        for agent in due:
            if agent.state == RECOVERED:
                agent.streak = 0
                self._set(agent, STALLED, watermark)  # silent again: the same episode goes on
            elif agent.state == ALIVE:
                silent.append(agent)
        if silent:
            cohort = self._mass_cohort(watermark)
            if cohort:
                events.append(self._hold(cohort, watermark))
            events.extend(self._silent(agent, watermark) for agent in silent if not agent.held)
        events.extend(self._confirm_held(watermark))
        return events

    def window_closed(self, rows: dict[str, Any], start: int, end: int) -> list[hb.AgentEvent]:
        """The hung rule, for a closed window: `rows` maps agent -> core.windowstats.WindowStats."""
        events = []
        threshold = self.rules.hung_cpu
        for agent_id, acc in rows.items():
            if acc.beats < 2 or acc.cpu_max >= threshold or set(acc.statuses) != {hb.RUNNING}:
                continue
            agent = self.agents.get(agent_id)
            if agent is None or agent.state != ALIVE or agent.status != hb.RUNNING:
                continue
            events.append(
                self._stall(
                    agent,
                    "hung",
                    end,
                    {
                        "cpu_max": round(acc.cpu_max, 4),
                        "hung_cpu": threshold,
                        "beats": acc.beats,
                        "window_start_ms": start,
                        "window_s": (end - start) / 1000,
                    },
                )
            )
        return events

    # --- queries ------------------------------------------------------------------------------

    def phi_of(self, agent: Agent, at: int) -> float:
        return phi_at(agent.state, agent.last_seen, agent.stats(self.rules), at)

    def state_of(self, agent: Agent, at: int) -> str:
        """The reported state, by the rule every reader applies (core.views.reported_state)."""
        rules = self.rules
        return reported_state(
            agent.state, at - agent.last_seen, self.phi_of(agent, at), rules.timeout_ms, rules.phi_suspect
        )

    # --- rules --------------------------------------------------------------------------------

    def _offset(self, agent: Agent) -> int:
        """Silence after which the agent is stalled: the phi deadline, capped by the hard timeout."""
        rules = self.rules
        n = agent.hist_n
        if n < MIN_SAMPLES:
            return rules.timeout_ms
        # Agent.stats, unrolled: this runs for every heartbeat
        mean = agent.hsum / n
        var = agent.hsq / n - mean * mean
        std = math.sqrt(var) if var > 0.0 else 0.0
        if std < rules.min_std_ms:
            std = rules.min_std_ms
        offset = int(mean + rules.acceptable_pause_ms + self._y_stall * std)
        return offset if offset < rules.timeout_ms else rules.timeout_ms

    def _defer_deadlines(self, at: int, heard_since: int = 0) -> None:
        """No deadline before `at` plus the agent's silence limit, for the agents last heard at or after
        `heard_since`: the pipeline could not see their beats."""
        for agent in self.agents.values():
            if agent.bucket < 0 or agent.last_seen < heard_since:
                continue
            deadline = at + self._offset(agent)
            if agent.deadline < deadline:
                self._schedule(agent, deadline)

    def _healthy(self, agent: Agent) -> bool:
        """Does this beat count towards recovery from the agent's stall reason?"""
        if agent.reason == "hung":
            return agent.status != hb.RUNNING or agent.cpu >= self.rules.hung_cpu
        if agent.reason == "overdue":
            return agent.status != hb.RUNNING or agent.last_seen - agent.task_started <= self.rules.max_task_ms
        return True

    def _mass_cohort(self, watermark: int) -> list[Agent]:
        """The agents that have been silent for half the timeout or more, when they are too many to be
        individual stalls (agents cut off together are all that silent when the first deadline passes,
        while healthy ones are silent for one beat interval at most)."""
        rules = self.rules
        active = [a for a in self.agents.values() if a.state == ALIVE]
        cohort = [a for a in active if watermark - a.last_seen >= rules.timeout_ms / 2]
        if len(cohort) < rules.mass_min or len(cohort) <= rules.mass_fraction * len(active):
            return []
        return cohort

    def _hold(self, cohort: list[Agent], watermark: int) -> hb.AgentEvent:
        for agent in cohort:
            agent.held = watermark
            self._unschedule(agent)
            self._set(agent, STALLED, watermark)
            agent.reason = "mass_silence"
        self.mass[watermark] = {a.agent_id for a in cohort}
        self._mass_back[watermark] = 0
        active = sum(1 for a in self.agents.values() if a.state != LEFT)
        return hb.AgentEvent(
            type=hb.MASS_SILENCE,
            reason=f"{len(cohort)} of {active} agents of partition {self.partition} went silent together",
            detected_at_ms=watermark,
            last_seen_ms=max(a.last_seen for a in cohort),
            event_id=f"mass:{self.partition}:{watermark}",
            partition=self.partition,
            agent_ids=sorted(a.agent_id for a in cohort),
            figures={
                "agents": len(cohort),
                "active": active,
                "fraction": round(len(cohort) / max(active, 1), 3),
                "timeout_s": self.rules.timeout_ms / 1000,
            },
        )

    def _release(self, agent: Agent) -> None:
        if not agent.held:
            return
        cohort = self.mass.get(agent.held)
        if cohort is not None and agent.agent_id in cohort:
            cohort.discard(agent.agent_id)
            self._mass_back[agent.held] = self._mass_back.get(agent.held, 0) + 1
        agent.held = 0
        agent.reason = ""

    def _confirm_held(self, watermark: int) -> list[hb.AgentEvent]:
        """Individual stalls for held agents once the outage is over (most came back) or the hold ran
        out; and the `mass_silence_cleared` event for that cohort."""
        events = []
        for began, cohort in list(self.mass.items()):
            back = self._mass_back.get(began, 0)
            expired = watermark - began >= self.rules.mass_hold_ms
            if not expired and back < len(cohort) and back < (back + len(cohort)) / 2:
                continue
            for agent_id in sorted(cohort):
                agent = self.agents.get(agent_id)
                if agent is not None and agent.held == began:
                    agent.held = 0
                    agent.state = ALIVE  # so that _stall records the individual episode
                    events.append(
                        self._stall(
                            agent,
                            "silent",
                            watermark,
                            {
                                "timeout_s": self.rules.timeout_ms / 1000,
                                "silence_ms": watermark - agent.last_seen,
                                "held_ms": watermark - began,
                            },
                        )
                    )
            events.append(
                hb.AgentEvent(
                    type=hb.MASS_SILENCE_CLEARED,
                    reason="hold expired" if expired and back < len(cohort) else "agents returned",
                    detected_at_ms=watermark,
                    event_id=f"mass:{self.partition}:{began}:cleared",
                    partition=self.partition,
                    agent_ids=sorted(cohort),
                    figures={"returned": back, "still_silent": len(cohort)},
                )
            )
            del self.mass[began]
            self._mass_back.pop(began, None)
        return events

    def _silent(self, agent: Agent, watermark: int) -> hb.AgentEvent:
        figures = {"timeout_s": self.rules.timeout_ms / 1000, "silence_ms": watermark - agent.last_seen}
        stats = agent.stats(self.rules)
        if stats is not None:
            figures["phi"] = round(phi(watermark - agent.last_seen, *stats), 3)
            figures["mean_interval_ms"] = round(stats[0] - self.rules.acceptable_pause_ms, 1)
        return self._stall(agent, "silent", watermark, figures)

    def _stall(self, agent: Agent, reason: str, at: int, figures: dict[str, float]) -> hb.AgentEvent:
        agent.episode = agent.last_seen
        agent.reason = reason
        agent.streak = 0
        self._set(agent, STALLED, at)
        return self._event(agent, hb.STALL, reason, at, figures)

    def _recover(self, agent: Agent, at: int, reason: str) -> hb.AgentEvent:
        """`reason`: the stall reason it recovered from (or `left`)."""
        event = self._event(
            agent,
            hb.RECOVERY,
            reason,
            at,
            {
                "episode_ms": at - agent.episode,
                "healthy_beats": agent.streak,
            },
        )
        agent.episode = 0
        agent.reason = ""
        agent.streak = 0
        self._set(agent, ALIVE, at)
        return event

    def _event(
        self, agent: Agent, kind: hb.EventType, reason: str, at: int, figures: dict[str, float]
    ) -> hb.AgentEvent:
        name = "stall" if kind == hb.STALL else "recovery"
        return hb.AgentEvent(
            type=kind,
            agent_id=agent.agent_id,
            task_id=agent.task_id,
            reason=reason,
            last_seen_ms=agent.last_seen if kind == hb.RECOVERY else agent.episode,
            detected_at_ms=at,
            event_id=f"{agent.agent_id}:{agent.episode}:{name}",
            partition=self.partition,
            figures=figures,
        )

    def _set(self, agent: Agent, state: str, at: int) -> None:
        if agent.state != state:
            agent.state = state
            agent.since = at
            self.changed.add(agent.agent_id)

    # --- the deadline wheel -------------------------------------------------------------------

    def _pop_due(self, watermark: int) -> list[Agent]:
        last = watermark // BUCKET_MS
        if self._next_bucket < 0:
            self._next_bucket = min(self._wheel, default=last)
        due = []
        for bucket in range(self._next_bucket, last + 1):
            ids = self._wheel.pop(bucket, None)
            if not ids:
                continue
            for agent_id in ids:
                agent = self.agents[agent_id]
                if agent.deadline > watermark:  # later in the current bucket
                    self._wheel.setdefault(bucket, set()).add(agent_id)
                    continue
                agent.bucket = -1
                due.append(agent)
        self._next_bucket = last
        return due

    def _schedule(self, agent: Agent, deadline: int) -> None:
        agent.deadline = deadline
        bucket = deadline // BUCKET_MS
        if bucket == agent.bucket:
            return
        if agent.bucket >= 0:  # _unschedule, inline: this runs for nearly every heartbeat
            ids = self._wheel.get(agent.bucket)
            if ids is not None:
                ids.discard(agent.agent_id)
        agent.bucket = bucket
        self._wheel.setdefault(bucket, set()).add(agent.agent_id)
        if self._next_bucket >= 0 and bucket < self._next_bucket:
            self._next_bucket = bucket

    def _unschedule(self, agent: Agent) -> None:
        if agent.bucket >= 0:
            ids = self._wheel.get(agent.bucket)
            if ids is not None:
                ids.discard(agent.agent_id)
            agent.bucket = -1
