"""The task registry's scripts on a real Valkey: the protocol's transitions, idempotency and fencing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from heartbeat_registry.core import redis_client
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tasks import (
    ASSIGNED,
    ORPHANED,
    RUNNING,
    Outcome,
    TaskStore,
    parse_fences,
    parse_offers,
)
from tests.conftest import BOTH_REDIS

pytestmark = BOTH_REDIS


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[TaskStore]:
    client = redis_client.connect(settings)
    try:
        yield TaskStore(client, Names.of(settings))
    finally:
        await client.aclose()


async def orphan(store: TaskStore, *stall: str | int) -> Outcome:
    """One stall of (task, agent, reason, event_id, position, first_seen_ms)."""
    return (await store.orphan_many([stall]))[0]  # type: ignore[list-item]


async def agent_entries(settings: Settings, agent: str) -> tuple[dict[str, int], list]:
    client = redis_client.connect(settings)
    names = Names.of(settings)
    shard = partition_of(agent, names.shards)
    try:
        fences = (await client.hget(names.fenced(shard), agent) or b"").decode()
        offers = (await client.hget(names.assigned(shard), agent) or b"").decode()
    finally:
        await client.aclose()
    return parse_fences(fences) if fences else {}, parse_offers(offers) if offers else []


async def test_a_stall_orphans_once_fences_and_records_why(store: TaskStore, settings: Settings) -> None:
    first = await orphan(store, "job-1", "a1", "silent", "a1:100:stall", "ev:0:7", 100)
    assert first.outcome == "applied" and first.epoch == 1 and first.agent == "a1"
    # the same event again: from the same record position it is a redelivery, from another a duplicate
    assert (await orphan(store, "job-1", "a1", "silent", "a1:100:stall", "ev:0:7", 100)).outcome == "redo"
    assert (await orphan(store, "job-1", "a1", "silent", "a1:100:stall", "ev:0:9", 100)).outcome == "duplicate"
    record = await store.get("job-1")
    assert record is not None and (record["state"], record["epoch"], record["owner"]) == (ORPHANED, 1, "a1")
    fences, _ = await agent_entries(settings, "a1")
    assert fences == {"job-1": 1}
    history = await store.history("job-1")
    assert [(c["epoch"], c["agent"], c["what"]) for c in history] == [(0, "a1", RUNNING), (1, "a1", ORPHANED)]
    assert history[1]["why"] == "silent"
    assert [t for t, _ in await store.in_state(ORPHANED)] == ["job-1"]


async def test_assign_only_at_the_current_epoch_then_the_assignee_takes_over(
    store: TaskStore, settings: Settings
) -> None:
    assert (await store.assign("nobody-knows", "a2", 1, 30_000)).outcome == "not_found"
    await orphan(store, "job-2", "a1", "hung", "a1:5:stall", "ev:0:1", 5)
    stale = await store.assign("job-2", "a2", 0, 30_000)
    assert (stale.outcome, stale.epoch, stale.agent) == ("stale", 1, ORPHANED)
    assert (await store.assign("job-2", "a2", 1, 30_000)).outcome == "ok"
    assert (await store.assign("job-2", "a2", 1, 30_000)).outcome == "ok"  # a retried call
    assert (await store.assign("job-2", "a3", 1, 30_000)).outcome == "stale"  # handed over already
    _, offers = await agent_entries(settings, "a2")
    assert [(o.task_id, o.epoch) for o in offers] == [("job-2", 1)]
    assert await store.confirm("job-2", "a1", 1) is None  # the fenced owner cannot take it back
    assert await store.confirm("job-2", "a2", 1) is not None
    record = await store.get("job-2")
    assert record is not None and (record["state"], record["owner"], record["epoch"]) == (RUNNING, "a2", 1)
    assert (await agent_entries(settings, "a2"))[1] == []  # the offer is withdrawn
    assert [c["what"] for c in await store.history("job-2")] == [RUNNING, ORPHANED, ASSIGNED, RUNNING]


async def test_an_assignment_not_taken_up_expires_with_the_next_epoch(store: TaskStore, settings: Settings) -> None:
    await orphan(store, "job-3", "a1", "silent", "a1:1:stall", "ev:0:1", 1)
    await store.assign("job-3", "a4", 1, 0)  # deadline: now
    assert [(t, e, a) for t, e, a in await store.expired(10**13)] == [("job-3", 1, "a4")]
    expired = await store.expire("job-3", 1, "expire:job-3:1", "ev:0:2")
    assert (expired.outcome, expired.epoch, expired.agent) == ("applied", 2, "a4")
    assert (await store.expire("job-3", 1, "expire:job-3:1", "ev:0:3")).outcome == "duplicate"
    fences, offers = await agent_entries(settings, "a4")
    assert fences == {"job-3": 2} and offers == []
    assert await store.confirm("job-3", "a4", 1) is None  # too late: it is orphaned again
    record = await store.get("job-3")
    assert record is not None and (record["state"], record["epoch"]) == (ORPHANED, 2)


async def test_a_stall_of_an_agent_that_no_longer_owns_the_task_changes_nothing(store: TaskStore) -> None:
    await orphan(store, "job-4", "a1", "silent", "a1:1:stall", "ev:0:1", 1)
    await store.assign("job-4", "a5", 1, 30_000)
    await store.confirm("job-4", "a5", 1)
    late = await orphan(store, "job-4", "a1", "silent", "a1:9:stall", "ev:0:2", 9)
    assert (late.outcome, late.epoch, late.agent) == ("not_owner", 1, "a5")
    record = await store.get("job-4")
    assert record is not None and (record["owner"], record["epoch"]) == ("a5", 1)
    assert (await store.history("job-4"))[-1]["what"] == "not_reassigned"
