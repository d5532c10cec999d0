"""The checks after a soak: the whole recorded history against what the system promises.

- availability: the share of heartbeats due that were acknowledged within 1 s. Due: every heartbeat an
  agent sent during the run (not while the soak collects its history afterwards), plus the ones it
  could not send while it had no connection (a gap between two sends longer than the interval allows,
  less one interval); an agent's own silences (killed, paused) do not count.
- durability: acknowledged heartbeats (agent, seq) missing from the Redis streams, from Kafka `heartbeats`
  and from the window counts (a closed window counting fewer beats of an agent than were acknowledged in
  it, each in the window of its first stored copy).
- detection: stalls of agents that did nothing wrong, or a second stall of one that did (false); killed and
  hung agents without a stall (missed); an event id seen twice (duplicate).
- recovery: a reassignment published twice (same task and epoch, or same stall); tasks not running at the
  end; two agents beating RUNNING on one task both unfenced at once; alerts firing that should be resolved,
  or missing that should fire.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from heartbeat_registry.hbreg.bench.common import percentile
from heartbeat_registry.pb import hb

FAST_S = 1.0


def availability(
    agents: dict[str, Any],
    interval: float,
    jitter: float,
    blame: Callable[[float], str] = lambda _: "none",
    wall_offset: float = 0.0,
    until: float = math.inf,
) -> dict[str, Any]:
    """`blame`: the fault a missed heartbeat (by its monotonic send time) falls under, for
    `missed_by_fault`. `wall_offset`: wall = monotonic + this, to place the ingest's receive stamp of a
    late reply between the send and the reply (`late_replies`). `until`: the end of the run (monotonic);
    the beats sent after it, while the soak collects its history, are not counted."""
    fast = due = sent = 0
    missed: collections.Counter[str] = collections.Counter()
    quiet_misses: collections.Counter[int] = collections.Counter()  # outside every fault, by 10 s of the run
    first = min((r.sent[0] for r in agents.values() if len(r.sent)), default=0.0)
    to_ingest: list[float] = []  # late replies: send -> the ingest's receive stamp (client, network, failover)
    after: list[float] = []  # late replies: the stamp -> the reply in the client (Redis write, reply, client)
    longest = interval * (1 + jitter) + FAST_S  # a beat that waited for a reply of up to FAST_S
    for record in agents.values():
        previous: float | None = None
        for index, at in enumerate(record.sent):
            if at >= until:
                break
            if any(start <= at < end for start, end in record.silent):
                previous = None
                continue
            sent += 1
            due += 1
            rtt = record.rtt[index]
            if not math.isnan(rtt) and rtt <= FAST_S:
                fast += 1
            else:
                cause = blame(at)
                missed[cause] += 1
                if cause == "none":
                    quiet_misses[int((at - first) // 10 * 10)] += 1
                if not math.isnan(rtt):
                    before = record.received[index] / 1000 - (at + wall_offset)
                    to_ingest.append(before)
                    after.append(rtt - before)
            if previous is not None and at - previous > longest:
                unsent = max(0, round((at - previous) / interval) - 1)  # beats it could not send meanwhile
                due += unsent
                missed[blame(previous)] += unsent
            previous = at
    return {
        "availability": round(fast / due, 6) if due else 0.0,
        "heartbeats_sent": sent,
        "heartbeats_due": due,
        "acknowledged_within_1s": fast,
        "missed_by_fault": dict(missed.most_common()),
        "missed_outside_faults_by_10s": {f"{t}s": n for t, n in sorted(quiet_misses.most_common(10))},
        # where the time of the replies later than FAST_S went (the others got none)
        "late_replies": {
            "count": len(to_ingest),
            "to_ingest_s_p50_p99": _p50_p99(to_ingest),
            "after_ingest_s_p50_p99": _p50_p99(after),
        },
    }


def failed_calls(
    agents: dict[str, Any], failures: Sequence[tuple[str, str]], blame: Callable[[int], str]
) -> dict[str, Any]:
    """The clients' failed calls, by what failed (the ten most common), and by the fault in effect (`blame`:
    the three most common problems under each): the other side of the misses, so a run tells which
    fault made the clients fail and how."""
    by_problem: collections.Counter[str] = collections.Counter()
    by_fault: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for record in agents.values():
        for at_ms, index in zip(record.failed_at, record.failure, strict=True):
            problem = failures[index][1]
            by_problem[problem] += 1
            by_fault[blame(at_ms)][problem] += 1
    ranked = sorted(by_fault.items(), key=lambda item: -sum(item[1].values()))
    return {
        "count": sum(by_problem.values()),
        "by_problem": dict(by_problem.most_common(10)),
        "by_fault": {label: dict(problems.most_common(3)) for label, problems in ranked},
    }


def _p50_p99(values: list[float]) -> list[float]:
    values = sorted(values)
    return [round(percentile(values, q), 3) for q in (0.5, 0.99)] if values else []


def acknowledged(agents: dict[str, Any]) -> set[tuple[str, int]]:
    return {
        (agent, index + 1)
        for agent, record in agents.items()
        for index, rtt in enumerate(record.rtt)
        if not math.isnan(rtt)
    }


def window_losses(
    agents: dict[str, Any], windows: dict[str, dict[int, dict]], window_ms: int, stored: dict[tuple[str, int], int]
) -> tuple[int, int]:
    """(acknowledged heartbeats missing from closed windows, closed windows checked). `stored`: (agent, seq)
    -> receive time of its first copy in the streams. A heartbeat both ingests stored counts once, in the
    window of the copy the worker folded in first, which need not be the one whose reply the agent took."""
    lost = checked = 0
    for agent, record in agents.items():
        acked: collections.Counter[int] = collections.Counter()
        for index, (received, rtt) in enumerate(zip(record.received, record.rtt, strict=True)):
            if not math.isnan(rtt):
                at = stored.get((agent, index + 1), received)
                acked[at - at % window_ms] += 1
        rows = windows.get(agent, {})
        for start, count in acked.items():
            row = rows.get(start)
            if row is None or not row.get("final"):
                continue
            checked += 1
            lost += max(0, count - row["beats"])
    return lost, checked


def detection(
    events: Sequence[hb.AgentEvent],
    fleet_ids: set[str],
    killed: set[str],
    hung: set[str],
    blame: Callable[[int], str] = lambda _: "none",
) -> dict[str, Any]:
    """`blame`: the fault a false stall (by its agent's last beat, wall ms) falls under."""
    ids: collections.Counter[str] = collections.Counter()
    stalls: dict[str, list[hb.AgentEvent]] = collections.defaultdict(list)  # agent -> its first stall per id
    for event in events:
        ids[event.event_id] += 1
        if event.type == hb.STALL and event.agent_id in fleet_ids and ids[event.event_id] == 1:
            stalls[event.agent_id].append(event)
    expected = killed | hung
    false = [e for a, found in stalls.items() for e in (found[1:] if a in expected else found)]
    return {
        "false_stalls": len(false),
        "false_stalls_by_fault": dict(collections.Counter(blame(e.last_seen_ms) for e in false).most_common()),
        "false_stall_details": [
            {"agent": e.agent_id, "reason": e.reason, "last_seen": e.last_seen_ms, "detected": e.detected_at_ms}
            for e in false[:10]
        ],
        "missed_stalls": sum(1 for a in expected if not stalls.get(a)),
        "duplicate_events": sum(n - 1 for n in ids.values() if n > 1),
        "duplicate_event_ids": sorted(i for i, n in ids.items() if n > 1)[:10],
        "pipeline_lag_events": sum(1 for e in events if e.type == hb.PIPELINE_LAG),
    }


def beats_around(agents: dict[str, Any], details: list[dict[str, Any]], recorder: Any) -> None:
    """Add to each false stall (`false_stall_details`) what its agent did from a second before its last
    stored beat until the stall. `beats`: when each was sent (wall ms), and the seconds to its reply
    (None: never acknowledged). Beats sent but never acknowledged: the system did not hear the agent (an
    overloaded or cut-off ingest); one acknowledged in between: the pipeline lost or misjudged it.
    `failed_calls`: the client's failed calls (when, to which ingest, what failed, how long it waited
    before the next try). `fleet_loop_lag_max_s`: how late the soak's own event loop woke up at worst
    meanwhile, which delays every beat of the fleet (the instrument, not the system)."""
    failures, wall_offset = recorder.failures, recorder.wall_offset
    for detail in details:
        record = agents.get(detail["agent"])
        if record is None:
            continue
        since, until = detail["last_seen"] - 1000, detail["detected"]
        detail["beats"] = [
            {"seq": index + 1, "sent": sent, "acked_in_s": None if math.isnan(rtt) else round(rtt, 3)}
            for index, (at, rtt) in enumerate(zip(record.sent, record.rtt, strict=True))
            if since <= (sent := int((at + wall_offset) * 1000)) <= until
        ]
        detail["failed_calls"] = [
            {"at": at, "endpoint": failures[index][0], "problem": failures[index][1], "retry_in_s": round(wait, 3)}
            for at, index, wait in zip(record.failed_at, record.failure, record.retry_in, strict=True)
            if since <= at <= until
        ]
        lags = [lag for at, lag in zip(recorder.loop_at, recorder.loop_lag, strict=True) if since <= at <= until]
        detail["fleet_loop_lag_max_s"] = round(max(lags, default=0.0), 3)


def loop_lag(recorder: Any, run_until: float) -> dict[str, Any]:
    """How late the fleet's event loop woke up over the run (ticks of `Recorder.time_loop`): p50, p99,
    max, and the seconds of the run it spent more than half a second late."""
    until_ms = (run_until + recorder.wall_offset) * 1000
    lags = [lag for at, lag in zip(recorder.loop_at, recorder.loop_lag, strict=True) if at <= until_ms]
    if not lags:
        return {}
    late = sum(lag for lag in lags if lag > 0.5)
    p50, p99 = _p50_p99(lags)  # sorts them
    return {"p50_s": p50, "p99_s": p99, "max_s": round(max(lags), 3), "over_0_5_s_total_s": round(late, 1)}


def blamer(faults: Sequence[Any]) -> Callable[[int], str]:
    """wall ms -> the fault (its `label`: kind, target and when) in effect then, from a second before it
    until a second after its recovery; `none` outside every fault."""

    def blame(at_ms: int) -> str:
        for fault in faults:
            recovered = fault.end_ms + int((fault.recovery_s or 0.0) * 1000)
            if fault.start_ms - 1000 <= at_ms <= recovered + 1000:
                return str(fault.label)
        return "none"

    return blame


def reasons(records: Iterable[hb.Reassignment]) -> dict[str, int]:
    return dict(collections.Counter(r.reason for r in records).most_common())


def duplicate_reassignments(records: Iterable[hb.Reassignment]) -> int:
    by_epoch: collections.Counter[tuple[str, int]] = collections.Counter()
    by_stall: collections.Counter[str] = collections.Counter()
    for record in records:
        by_epoch[(record.task_id, record.epoch)] += 1
        if record.stall_event_id:
            by_stall[record.stall_event_id] += 1
    return sum(n - 1 for n in by_epoch.values()) + sum(n - 1 for n in by_stall.values())


def two_unfenced_owners(beats: list[tuple[int, str]], history: list[dict]) -> list[str]:
    """Overlaps between agents' unfenced RUNNING spans on one task (a beat after the agent was fenced off
    the task, before it owned it again, does not count). `beats`: (receive time, agent) in time order;
    `history`: the task's history as the query API shows it."""
    fenced: dict[str, list[int]] = collections.defaultdict(list)
    owned: dict[str, list[int]] = collections.defaultdict(list)
    for change in history:
        if change["what"] in ("orphaned", "assignment_expired"):
            fenced[change["agent_id"]].append(change["at_ms"])
        elif change["what"] == "running":
            owned[change["agent_id"]].append(change["at_ms"])

    def unfenced(agent: str, at: int) -> bool:
        last_fence = max((t for t in fenced[agent] if t <= at), default=None)
        return last_fence is None or any(last_fence < t <= at for t in owned[agent])

    spans: dict[str, list[int]] = {}
    for at, agent in beats:
        if unfenced(agent, at):
            span = spans.setdefault(agent, [at, at])
            span[1] = at
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    return [f"{a}{sa} ~ {b}{sb}" for (a, sa), (b, sb) in zip(ordered, ordered[1:], strict=False) if sb[0] <= sa[1]]


def alerts(events: Iterable[hb.AgentEvent], active: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Alerts that should fire (an agent whose last event is a stall, a pipeline lag not caught up) and
    should not (the others), against Alertmanager's active alerts."""
    last: dict[str, int] = {}
    for event in events:  # in time order
        if event.type in (hb.STALL, hb.RECOVERY):
            last[f"AgentStalled:{event.agent_id}"] = event.type
        elif event.type in (hb.PIPELINE_LAG, hb.PIPELINE_CAUGHT_UP):
            last["PipelineLag"] = event.type
    firing = set()
    for alert in active:
        labels = alert.get("labels", {})
        name = labels.get("alertname")
        if name == "AgentStalled":
            firing.add(f"AgentStalled:{labels.get('agent_id')}")
        elif name == "PipelineLag":
            firing.add("PipelineLag")
    should = {key for key, kind in last.items() if kind in (hb.STALL, hb.PIPELINE_LAG)}
    should_not = set(last) - should
    return {
        "unresolved_alerts": len(firing & should_not),
        "unfired_alerts": len(should - firing),
        "unresolved_alert_keys": sorted(firing & should_not)[:20],
        "unfired_alert_keys": sorted(should - firing)[:20],
    }
