"""The chaos soak, five minutes of it, as a user runs it: `hbreg chaos --json`, with its goals as the
assertions. It starts its own Valkey, Kafka, Alertmanager and Toxiproxy (it restarts them), so it does
not use the session's."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil
import subprocess
import sys

import pytest

from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.chaos import faults, verdict
from heartbeat_registry.pb import hb
from tests.conftest import require_binary

DURATION_S = 300
AGENTS = 300


def test_schedule_is_seeded_and_has_every_fault_kind() -> None:
    replicas = {"ingest": 2, "bridge": 2, "worker": 2, "query": 2, "reassign": 2, "alerter": 2, "assigner": 1}
    plan = faults.plan(7, DURATION_S, replicas)
    again = faults.plan(7, DURATION_S, replicas)
    other = faults.plan(8, DURATION_S, replicas)
    assert [(f.kind, f.target, f.at_s) for f in plan] == [(f.kind, f.target, f.at_s) for f in again]
    assert [(f.kind, f.target) for f in plan] != [(f.kind, f.target) for f in other]
    kinds = {f.kind for f in plan}
    assert kinds == {"kill", "pause", "valkey_restart", "kafka_restart", "partition", "latency", "reset", "bandwidth"}
    assert {f.target.partition(".")[0] for f in plan if f.kind == "kill"} == set(faults.KILLED)
    starts = [f.at_s for f in plan]
    assert starts == sorted(starts) and starts[-1] + faults.COOLDOWN_S <= DURATION_S
    assert all(b - a >= faults.MIN_GAP_S for a, b in zip(starts, starts[1:], strict=False))


def test_detection_verdict_counts_false_missed_and_duplicate() -> None:
    def stall(agent: str, episode: int) -> hb.AgentEvent:
        return hb.AgentEvent(type=hb.STALL, agent_id=agent, event_id=f"{agent}:{episode}:stall")

    events = [stall("dead", 1), stall("dead", 1), stall("fine", 1), stall("hung", 1), stall("dead", 2)]
    found = verdict.detection(events, {"dead", "fine", "hung", "gone"}, killed={"dead", "gone"}, hung={"hung"})
    # fine: a false stall; dead's second episode: false; gone: missed; dead:1 twice: a duplicate
    assert (found["false_stalls"], found["missed_stalls"], found["duplicate_events"]) == (2, 1, 1)


def test_availability_counts_the_run_only_and_splits_late_replies() -> None:
    from heartbeat_registry.hbreg.chaos.fleet import Record

    record = Record()
    # sent at 0..4 s (monotonic); replies: fast, fast, late (1.5 s: stamped 1.2 s after the send), none,
    # and one after the run (sent at 4 s, the run ends at 3.5 s): not counted whatever its fate
    for at, rtt, stamped in ((0.0, 0.1, 0.05), (1.0, 0.2, 0.1), (2.0, 1.5, 1.2), (3.0, math.nan, 0.0), (4.0, 9, 1)):
        record.sent.append(at)
        record.rtt.append(rtt)
        record.received.append(int((100.0 + at + stamped) * 1000) if stamped else 0)
    found = verdict.availability({"a": record}, 1.0, 0.2, wall_offset=100.0, until=3.5)
    assert (found["heartbeats_due"], found["acknowledged_within_1s"]) == (4, 2)
    assert found["missed_by_fault"] == {"none": 2} and found["missed_outside_faults_by_10s"] == {"0s": 2}
    late = found["late_replies"]
    assert late["count"] == 1 and late["to_ingest_s_p50_p99"] == [1.2, 1.2]
    assert late["after_ingest_s_p50_p99"] == [0.3, 0.3]


def test_misses_are_blamed_on_the_one_fault_in_effect() -> None:
    """From a second before a fault until a second after its recovery, by the single fault (two faults of
    the same kind and target are told apart by when they came)."""
    from heartbeat_registry.hbreg.chaos.faults import Fault

    first = Fault("partition", "ingest.1-redis", 20.0, 10.0, start_ms=20_000, end_ms=30_000, recovery_s=0.5)
    again = Fault("partition", "ingest.1-redis", 40.0, 10.0, start_ms=40_000, end_ms=50_000, recovery_s=None)
    blame = verdict.blamer([first, again])
    assert [blame(at) for at in (18_999, 19_000, 31_500, 31_501, 39_000, 51_000)] == [
        "none",
        "partition ingest.1-redis at 20 s",
        "partition ingest.1-redis at 20 s",
        "none",
        "partition ingest.1-redis at 40 s",
        "partition ingest.1-redis at 40 s",
    ]


def test_a_false_stall_carries_its_agent_s_beats_around_the_silence() -> None:
    """The beats sent from a second before the agent's last stored beat until the stall, with how long
    each took to be acknowledged (None: never), so a report tells an unheard agent from a lost beat; and
    the client's failed calls in that span, from its warnings (kept per agent, not printed)."""
    from heartbeat_registry.hbreg.chaos.fleet import Record, Recorder

    record = Record()
    for at, rtt in ((0.0, 0.1), (1.0, 0.2), (2.0, math.nan), (3.0, math.nan), (9.0, 0.1)):
        record.sent.append(at)
        record.rtt.append(rtt)
        record.received.append(0)
    recorder = Recorder()
    recorder.agents["a"] = record
    for at, endpoint, problem, wait in (
        (99.0, "ingest-2", "UNAVAILABLE: redis unreachable", 0.05),  # before the span
        (102.5, "ingest-2", "TimeoutError()", 0.05),
        (102.6, "ingest-1", "TimeoutError()", 1.2),
        (103.8, "ingest-2", "TimeoutError()", 2.4),
    ):
        warning = logging.makeLogRecord(
            {"levelno": logging.WARNING, "agent_id": "a", "endpoint": endpoint, "problem": problem, "retry_in_s": wait}
        )
        warning.created = at
        assert recorder.client_warning(warning) is False  # kept, not printed
    assert recorder.client_warning(logging.makeLogRecord({"levelno": logging.ERROR, "agent_id": "a"})) is True
    details = [{"agent": "a", "reason": "silent", "last_seen": 101_200, "detected": 106_200}, {"agent": "x"}]
    details[1].update(last_seen=0, detected=0)
    recorder.wall_offset = 100.0
    for at, lag in ((101_000, 0.01), (103_000, 1.5), (107_000, 3.0)):  # the last one after the stall
        recorder.loop_at.append(at)
        recorder.loop_lag.append(lag)
    verdict.beats_around(recorder.agents, details, recorder)
    assert details[0]["beats"] == [
        {"seq": 2, "sent": 101_000, "acked_in_s": 0.2},
        {"seq": 3, "sent": 102_000, "acked_in_s": None},
        {"seq": 4, "sent": 103_000, "acked_in_s": None},
    ]
    assert details[0]["failed_calls"] == [
        {"at": 102_500, "endpoint": "ingest-2", "problem": "TimeoutError()", "retry_in_s": 0.05},
        {"at": 102_600, "endpoint": "ingest-1", "problem": "TimeoutError()", "retry_in_s": 1.2},
        {"at": 103_800, "endpoint": "ingest-2", "problem": "TimeoutError()", "retry_in_s": 2.4},
    ]
    assert details[0]["fleet_loop_lag_max_s"] == 1.5
    assert "beats" not in details[1]  # not an agent of the fleet
    assert verdict.loop_lag(recorder, run_until=6.5) == {  # the run ended at wall 106.5 s
        "p50_s": 0.01,
        "p99_s": 1.5,
        "max_s": 1.5,
        "over_0_5_s_total_s": 1.5,
    }
    assert verdict.failed_calls(
        recorder.agents, recorder.failures, lambda at: "reset" if at >= 102_000 else "none"
    ) == {
        "count": 4,
        "by_problem": {"TimeoutError()": 3, "UNAVAILABLE: redis unreachable": 1},
        "by_fault": {"reset": {"TimeoutError()": 3}, "none": {"UNAVAILABLE: redis unreachable": 1}},
    }


def test_the_logs_are_kept_when_a_promise_other_than_availability_breaks(tmp_path) -> None:
    from heartbeat_registry.hbreg.chaos.run import keep_logs

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker.1.log").write_text("the worker's lines")
    assert keep_logs({"failed_goals": []}, logs) is None
    assert keep_logs({"failed_goals": ["availability: 0.95 (goal >= 0.999)"]}, logs) is None
    kept = keep_logs({"failed_goals": ["availability: 0.95 (goal >= 0.999)", "missed_stalls: 52 (goal <= 0)"]}, logs)
    assert kept is not None
    try:
        assert (pathlib.Path(kept) / "worker.1.log").read_text() == "the worker's lines"
    finally:
        shutil.rmtree(kept)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(DURATION_S + 600)
def test_five_minute_soak_meets_its_goals(tmp_path) -> None:
    require_binary(services.kafka_available(), f"Apache Kafka: {services.why_not_kafka()}")
    require_binary(services.alertmanager_binary() is not None, "prometheus-alertmanager (make install)")
    require_binary(services.toxiproxy_binary() is not None, "Toxiproxy's server (make install builds it with Go)")
    done = subprocess.run(
        [sys.executable, "-m", "heartbeat_registry", "chaos", "--duration", f"{DURATION_S}s", "--agents", str(AGENTS)]
        + ["--seed", "7", "--keep", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=DURATION_S + 540,
    )
    assert done.stdout.strip(), done.stderr[-5000:]
    result = json.loads(done.stdout)
    # positive controls: the faults happened and the agents' faults were seen
    assert len(result["faults"]) >= 16 and all(f["end"] >= f["start"] > 0 for f in result["faults"])
    assert result["killed_agents"] > 0 and result["reassignments"] >= result["killed_agents"]
    assert result["acked"] > DURATION_S * AGENTS * 0.8 and result["windows_checked"] > 0
    blamed = sum(n for cause, n in result["missed_by_fault"].items() if cause != "none")
    assert sum(f["missed"] for f in result["faults"]) == blamed  # each fault's own share, summed
    # every goal of the soak, availability (>= 0.999 of the heartbeats acknowledged within 1 s) included
    shown = json.dumps({k: v for k, v in result.items() if k != "faults"}, indent=1)
    assert result["failed_goals"] == [], shown
