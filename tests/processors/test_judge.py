"""`judge` (how `hbreg tune` judges its extra parameter sets) decides exactly what `PartitionState.fold`
decides, record by record, whatever happens in the records."""

from __future__ import annotations

import random

import pytest

from heartbeat_registry.pb import hb
from processors.liveness import Liveness, Rules
from processors.partition import PartitionState, judge

T0 = 1_800_000_000_000


def records(seed: int) -> list[hb.HeartbeatColumns]:
    """60 s of 40 agents beating every ~500 ms with everything the rules look at: pauses, deaths, low CPU
    (hung), a task run too long (overdue), agents leaving, 25 silent together (a mass silence), and beats
    stored twice."""
    rng = random.Random(seed)
    fate = {f"a{i}": rng.choice(["steady", "pause", "dead", "hung", "leaves", "overdue"]) for i in range(40)}
    mass = set(rng.sample(sorted(fate), 25))
    next_beat = {a: rng.randint(0, 500) for a in fate}
    seq = dict.fromkeys(fate, 0)
    out = []
    for at in range(0, 60_000, 100):
        cols = hb.HeartbeatColumns(watermark_ms=T0 + at - 200)
        for agent, kind in fate.items():
            if next_beat[agent] > at:
                continue
            next_beat[agent] = at + rng.randint(400, 600)
            if (kind == "pause" and 20_000 <= at < 24_000) or (kind == "dead" and at >= 25_000):
                continue
            if agent in mass and 40_000 <= at < 47_000:
                continue
            status = hb.STOPPING if kind == "leaves" and at >= 30_000 else hb.RUNNING
            cpu = 0.001 if kind == "hung" and 10_000 <= at < 35_000 else 0.5
            task = f"{agent}-t" if kind == "overdue" else f"{agent}-t{at // 15_000}"  # a new task every 15 s
            cols.agent_id.append(agent)
            cols.task_id.append(task)
            cols.status.append(status)
            cols.timestamp.append(T0 + at)
            cols.cpu_util.append(cpu)
            cols.progress.append(float("nan"))
            cols.received_ms.append(T0 + at + rng.randint(0, 99))
            seq[agent] += 1
            cols.seq.append(seq[agent])
            if rng.random() < 0.05:  # stored twice: sent again to the other ingest, which stored it later
                for column in (cols.agent_id, cols.task_id, cols.status, cols.timestamp, cols.cpu_util):
                    column.append(column[-1])
                cols.progress.append(float("nan"))
                cols.received_ms.append(cols.received_ms[-1] + rng.randint(1, 50))
                cols.seq.append(seq[agent])
        out.append(cols)
    return out


STALL, RECOVERY, MASS = hb.STALL, hb.RECOVERY, hb.MASS_SILENCE


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    ("rules", "seen"),
    [
        (
            Rules(timeout_ms=2000, max_task_ms=30_000, mass_fraction=0.3, mass_min=10, mass_hold_ms=5000),
            {(STALL, "silent"), (STALL, "hung"), (STALL, "overdue"), (RECOVERY, "silent"), (MASS, "")},
        ),
        (
            Rules(timeout_ms=5000, phi_threshold=3, acceptable_pause_ms=0, recovery_beats=1, max_task_ms=20_000),
            {(STALL, "silent"), (STALL, "overdue"), (RECOVERY, "silent")},
        ),
    ],
)
def test_judge_decides_what_fold_decides(seed: int, rules: Rules, seen: set[tuple[int, str]]) -> None:
    state = PartitionState(0, 10_000, rules, grace_ms=1000)
    liveness = Liveness(0, rules)
    folded, judged = [], []
    for cols in records(seed):
        events, _ = state.fold(cols)
        closed = list(state.unpublished)
        state.forget_outputs()
        folded.extend(events)
        judged.extend(judge(liveness, cols, closed))
    assert [str(e) for e in judged] == [str(e) for e in folded]
    kinds = {(e.type, e.reason if e.type != MASS else "") for e in folded}
    assert seen <= kinds, kinds  # all of it happened, so all of it was compared
