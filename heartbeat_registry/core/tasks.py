"""The task registry in Redis: each task's owner, fencing epoch, state and history, and the fences and
pending assignments the ingest turns into ABANDON and ASSIGN directives.

States: `running` (its owner beats RUNNING on it) -> `orphaned` (the owner stalled; the epoch went up and
the owner is fenced off it) -> `assigned` (the Role Assignment service handed it to an agent at the
current epoch) -> `running` (that agent beat RUNNING on it). An assignment not taken up in time goes back
to `orphaned` with the next epoch. The epoch never goes down and is never reused. A task first seen only
through heartbeats has no record until something happens to it: it is owned by its reporter at epoch 0.

Every script touches the keys of one hash slot, so all of it runs unchanged on Redis Cluster:
- task-keyed state lives in one of `TASK_SHARDS` task shards (hash tag `{k<n>}`): the shard's `tasks`
  hash (task -> its record, JSON), the task's history list, and the shard's indexes (`orphaned`,
  `assigned` by deadline, `running`), all changed in the same script as the record;
- agent-keyed state lives in the agent's stream shard (hash tag `{s<n>}`, beside its registry entry): the
  `fenced` hash (agent -> `task epoch;task epoch...`, the tasks taken away from it) and the `assigned` hash
  (agent -> `task epoch deadline;...`, the tasks offered to it). The ingest's WRITE_SHARD reads both.

Idempotency: a record remembers the last event ids applied to it with the Kafka record position that
applied them. The same event again from the same position is a redelivery (`redo`: publish again, the
first attempt never committed); from another position it is a duplicate (`duplicate`: nothing to do).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.names import Names, partition_of

TASK_SHARDS = 16
HISTORY_KEPT = 200
ORPHANED, ASSIGNED, RUNNING = "orphaned", "assigned", "running"
TASK_STATES = (RUNNING, ORPHANED, ASSIGNED)

# A task's record and its history, as Lua helpers shared by the task scripts.
# KEYS: tasks (hash), history (list), orphaned (zset), assigned (zset by deadline), running (zset)
_TASK_LUA = """
local function load(task, owner, at)
  local raw = redis.call('HGET', KEYS[1], task)
  if raw then return cjson.decode(raw), false end
  return {owner = owner, epoch = 0, state = 'running', since = at, applied = {}}, true
end
local function note(epoch, agent, what, at, why)
  redis.call('RPUSH', KEYS[2], cjson.encode({epoch = epoch, agent = agent, what = what, at_ms = at, why = why}))
  redis.call('LTRIM', KEYS[2], -HISTORY_KEPT, -1)
end
local function save(task, t)
  redis.call('ZREM', KEYS[3], task)
  redis.call('ZREM', KEYS[4], task)
  redis.call('ZREM', KEYS[5], task)
  if t.state == 'orphaned' then redis.call('ZADD', KEYS[3], t.since, task)
  elseif t.state == 'assigned' then redis.call('ZADD', KEYS[4], t.deadline, task)
  else redis.call('ZADD', KEYS[5], t.since, task) end
  redis.call('HSET', KEYS[1], task, cjson.encode(t))
end
local function applied(t, event_id)
  for _, a in ipairs(t.applied) do
    if a[1] == event_id then return a end
  end
  return nil
end
local function remember(t, event_id, position, epoch, from)
  table.insert(t.applied, {event_id, position, epoch, from})
  while #t.applied > 16 do table.remove(t.applied, 1) end
end
""".replace("HISTORY_KEPT", str(HISTORY_KEPT))

# A stall of (agent, task): fence the owner off it and orphan it with the next epoch.
# ARGV: task, agent, reason, event_id, position, now, first_seen
# Returns {outcome, epoch, agent}: applied | redo | duplicate | not_owner | not_running
ORPHAN = (
    _TASK_LUA
    + """
local task, agent, at = ARGV[1], ARGV[2], tonumber(ARGV[6])
local t, new = load(task, agent, tonumber(ARGV[7]))
if new then note(0, agent, 'running', tonumber(ARGV[7]), 'first seen in heartbeats') end
local seen = applied(t, ARGV[4])
if seen then
  if seen[2] == ARGV[5] then return {'redo', tostring(seen[3]), seen[4]} end
  return {'duplicate', tostring(seen[3]), seen[4]}
end
if t.owner ~= agent then
  note(t.epoch, agent, 'not_reassigned', at, 'stalled, but ' .. t.owner .. ' owns it')
  remember(t, ARGV[4], ARGV[5], t.epoch, '')
  save(task, t)
  return {'not_owner', tostring(t.epoch), t.owner}
end
if t.state ~= 'running' then
  note(t.epoch, agent, 'not_reassigned', at, 'stalled while ' .. t.state)
  remember(t, ARGV[4], ARGV[5], t.epoch, '')
  save(task, t)
  return {'not_running', tostring(t.epoch), t.state}
end
t.epoch = t.epoch + 1
t.state = 'orphaned'
t.since = at
t.assignee = nil
t.deadline = nil
remember(t, ARGV[4], ARGV[5], t.epoch, agent)
note(t.epoch, agent, 'orphaned', at, ARGV[3])
save(task, t)
return {'applied', tostring(t.epoch), agent}
"""
)

# The Role Assignment service hands an orphaned task to an agent at its current epoch.
# ARGV: task, agent, epoch, now, deadline.  Returns {outcome, epoch, state}: ok | stale | not_found
ASSIGN = (
    _TASK_LUA
    + """
local task, agent, epoch, at = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local raw = redis.call('HGET', KEYS[1], task)
if not raw then return {'not_found', '0', ''} end
local t = cjson.decode(raw)
if t.state == 'assigned' and t.assignee == agent and t.epoch == epoch then
  return {'ok', tostring(t.epoch), t.state}
end
if t.state ~= 'orphaned' or t.epoch ~= epoch then return {'stale', tostring(t.epoch), t.state} end
t.state = 'assigned'
t.assignee = agent
t.deadline = tonumber(ARGV[5])
t.since = at
note(t.epoch, agent, 'assigned', at, 'handed over by the role assignment service')
save(task, t)
return {'ok', tostring(t.epoch), t.state}
"""
)

# The assignee beat RUNNING on the task: it is the owner now.
# ARGV: task, agent, epoch, now.  Returns {outcome, when it was assigned}: ok | stale
CONFIRM = (
    _TASK_LUA
    + """
local task, agent, epoch, at = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local raw = redis.call('HGET', KEYS[1], task)
if not raw then return {'stale'} end
local t = cjson.decode(raw)
if t.state == 'running' and t.owner == agent and t.epoch == epoch then return {'ok', '0'} end
if t.state ~= 'assigned' or t.assignee ~= agent or t.epoch ~= epoch then return {'stale', '0'} end
local assigned_at = t.since
t.state = 'running'
t.owner = agent
t.since = at
t.assignee = nil
t.deadline = nil
note(t.epoch, agent, 'running', at, 'took up the assignment')
save(task, t)
return {'ok', tostring(assigned_at)}
"""
)

# An assignment not taken up by its deadline: orphaned again with the next epoch.
# ARGV: task, epoch, now, event_id, position.  Returns {outcome, epoch, agent} as ORPHAN (or stale).
EXPIRE = (
    _TASK_LUA
    + """
local task, epoch, at = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local raw = redis.call('HGET', KEYS[1], task)
if not raw then return {'stale', '0', ''} end
local t = cjson.decode(raw)
local seen = applied(t, ARGV[4])
if seen then
  if seen[2] == ARGV[5] then return {'redo', tostring(seen[3]), seen[4]} end
  return {'duplicate', tostring(seen[3]), seen[4]}
end
if t.state ~= 'assigned' or t.epoch ~= epoch or t.deadline > at then return {'stale', tostring(t.epoch), ''} end
local assignee = t.assignee
t.epoch = t.epoch + 1
t.state = 'orphaned'
t.since = at
t.owner = assignee
t.assignee = nil
t.deadline = nil
remember(t, ARGV[4], ARGV[5], t.epoch, assignee)
note(t.epoch, assignee, 'assignment_expired', at, 'not taken up in time')
save(task, t)
return {'applied', tostring(t.epoch), assignee}
"""
)

# A decision not to reassign, kept in the task's history. ARGV: task, agent, why, now, first_seen
NOTE = (
    _TASK_LUA
    + """
local t, new = load(ARGV[1], ARGV[2], tonumber(ARGV[5]))
if new then note(0, ARGV[2], 'running', tonumber(ARGV[5]), 'first seen in heartbeats') end
note(t.epoch, ARGV[2], 'not_reassigned', tonumber(ARGV[4]), ARGV[3])
save(ARGV[1], t)
return 1
"""
)

# Agent-keyed entries `task epoch[ deadline];...` in the agent's stream shard.
# KEYS: fenced, assigned.  ARGV: agent, task, epoch[, deadline]
_ENTRIES_LUA = """
local function entries(key, agent, drop)
  local out = {}
  local raw = redis.call('HGET', key, agent)
  if raw then
    for entry in string.gmatch(raw, '[^;]+') do
      if string.match(entry, '^[^ ]+') ~= drop then table.insert(out, entry) end
    end
  end
  return out
end
local function put(key, agent, list)
  while #list > 8 do table.remove(list, 1) end
  if #list == 0 then redis.call('HDEL', key, agent) else redis.call('HSET', key, agent, table.concat(list, ';')) end
end
"""
# Fence the agent off the task (and withdraw any offer of it to the agent).
FENCE = (
    _ENTRIES_LUA
    + """
local fenced = entries(KEYS[1], ARGV[1], ARGV[2])
table.insert(fenced, ARGV[2] .. ' ' .. ARGV[3])
put(KEYS[1], ARGV[1], fenced)
put(KEYS[2], ARGV[1], entries(KEYS[2], ARGV[1], ARGV[2]))
return 1
"""
)
# Offer the task to the agent until the deadline (ASSIGN directives).
OFFER = (
    _ENTRIES_LUA
    + """
local offers = entries(KEYS[2], ARGV[1], ARGV[2])
table.insert(offers, ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
put(KEYS[2], ARGV[1], offers)
return 1
"""
)
# Withdraw the offer of the task to the agent (taken up, or expired).
WITHDRAW = (
    _ENTRIES_LUA
    + """
put(KEYS[2], ARGV[1], entries(KEYS[2], ARGV[1], ARGV[2]))
return 1
"""
)


def task_shard(task_id: str) -> int:
    return zlib.crc32(task_id.encode()) % TASK_SHARDS


class Outcome(NamedTuple):
    """What a task script did: `applied` / `redo` (publish the reassignment), or why nothing changed."""

    outcome: str
    epoch: int
    agent: str  # applied, redo, duplicate: the agent it was taken from; not_owner: the owner


class Offer(NamedTuple):
    task_id: str
    epoch: int
    deadline_ms: int


def parse_fences(raw: str) -> dict[str, int]:
    """`task epoch;...` -> task -> epoch."""
    out = {}
    for entry in raw.split(";"):
        task, _, epoch = entry.partition(" ")
        if task:
            out[task] = int(epoch or 0)
    return out


def parse_offers(raw: str) -> list[Offer]:
    """`task epoch deadline;...` -> the offers."""
    out = []
    for entry in raw.split(";"):
        parts = entry.split(" ")
        if len(parts) == 3:
            out.append(Offer(parts[0], int(parts[1]), int(parts[2])))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TaskStore:
    """The task registry's operations; each one script, or two on different slots in a safe order."""

    def __init__(self, client: aioredis.Redis, names: Names) -> None:
        self._redis = client
        self._names = names
        self._sources = {
            "orphan": ORPHAN,
            "assign": ASSIGN,
            "confirm": CONFIRM,
            "expire": EXPIRE,
            "note": NOTE,
            "fence": FENCE,
            "offer": OFFER,
            "withdraw": WITHDRAW,
        }
        self._scripts = {name: client.register_script(source) for name, source in self._sources.items()}

    def _task_keys(self, task_id: str) -> list[str]:
        n = self._names
        shard = task_shard(task_id)
        return [
            n.tasks(shard),
            n.task_history(shard, task_id),
            n.tasks_orphaned(shard),
            n.tasks_assigned(shard),
            n.tasks_running(shard),
        ]

    def _agent_keys(self, agent_id: str) -> list[str]:
        shard = partition_of(agent_id, self._names.shards)
        return [self._names.fenced(shard), self._names.assigned(shard)]

    async def _run(self, name: str, keys: list[str], *args: str | int) -> list[str]:
        reply = await self._scripts[name](keys=keys, args=list(args))
        return [_text(v) for v in reply] if isinstance(reply, list) else [_text(reply)]

    def _queue(self, pipe: aioredis.client.Pipeline, name: str, keys: list[str], *args: str | int) -> None:
        """A script call in a pipeline, sent as EVAL with its source: redis-py's cluster pipeline refuses
        EVALSHA (it could not load a script a node lacks in the middle of a pipeline), and the few KB of
        source cost less than the SCRIPT EXISTS round trip a single-node pipeline makes before EVALSHA.
        Redis caches the compiled script by its hash either way."""
        pipe.eval(self._sources[name], len(keys), *keys, *args)

    async def orphan_many(self, stalls: Sequence[tuple[str, str, str, str, str, int]]) -> list[Outcome]:
        """Stalls of (task, agent, reason, event_id, position, first_seen_ms), of distinct tasks: the records
        first (idempotent), then the fences (idempotent), each in one pipelined round trip, so that a crash
        in between is repaired by the redelivery."""
        if not stalls:
            return []
        now = now_ms()
        pipe = self._redis.pipeline(transaction=False)
        for task, agent, reason, event_id, at, first_seen in stalls:
            self._queue(pipe, "orphan", self._task_keys(task), task, agent, reason, event_id, at, now, first_seen)
        outcomes = [Outcome(_text(r[0]), int(_text(r[1])), _text(r[2])) for r in await pipe.execute()]
        pipe = self._redis.pipeline(transaction=False)
        for (task, agent, *_), outcome in zip(stalls, outcomes, strict=True):
            if outcome.outcome in ("applied", "redo"):
                self._queue(pipe, "fence", self._agent_keys(agent), agent, task, outcome.epoch)
        if len(pipe):
            await pipe.execute()
        return outcomes

    async def expire(self, task_id: str, epoch: int, event_id: str, position: str) -> Outcome:
        outcome, new_epoch, agent = await self._run(
            "expire", self._task_keys(task_id), task_id, epoch, now_ms(), event_id, position
        )
        if outcome in ("applied", "redo") and agent:
            await self._run("fence", self._agent_keys(agent), agent, task_id, int(new_epoch))
        return Outcome(outcome, int(new_epoch), agent)

    async def assign(self, task_id: str, agent_id: str, epoch: int, timeout_ms: int) -> Outcome:
        """Hand the task to the agent: the record, then the offer the ingest turns into ASSIGN."""
        now = now_ms()
        deadline = now + timeout_ms
        outcome, current, state = await self._run(
            "assign", self._task_keys(task_id), task_id, agent_id, epoch, now, deadline
        )
        if outcome == "ok":
            record = await self.get(task_id)
            deadline = record["deadline"] if record else deadline
            await self._run("offer", self._agent_keys(agent_id), agent_id, task_id, epoch, deadline)
        return Outcome(outcome, int(current), state)

    async def confirm(self, task_id: str, agent_id: str, epoch: int) -> int | None:
        """The assignee beat RUNNING on the task: the owner now; the offer is withdrawn. Returns the
        milliseconds from its assignment to now (0 if it owned it already), or None (not its task)."""
        now = now_ms()
        outcome, assigned_at = await self._run("confirm", self._task_keys(task_id), task_id, agent_id, epoch, now)
        await self._run("withdraw", self._agent_keys(agent_id), agent_id, task_id)
        if outcome != "ok":
            return None
        return now - int(float(assigned_at)) if float(assigned_at) else 0

    async def note(self, task_id: str, agent_id: str, why: str, first_seen_ms: int) -> None:
        await self._run("note", self._task_keys(task_id), task_id, agent_id, why, now_ms(), first_seen_ms)

    async def get(self, task_id: str) -> dict[str, Any] | None:
        raw = await self._redis.hget(self._names.tasks(task_shard(task_id)), task_id)
        return None if raw is None else dict(json.loads(raw))

    async def history(self, task_id: str) -> list[dict[str, Any]]:
        shard = task_shard(task_id)
        return [json.loads(e) for e in await self._redis.lrange(self._names.task_history(shard, task_id), 0, -1)]

    async def in_state(self, state: str, limit: int = 1000) -> list[tuple[str, float]]:
        """(task, score) of the tasks in `state` over every task shard, oldest first (orphaned, running:
        since; assigned: deadline)."""
        index = {
            ORPHANED: self._names.tasks_orphaned,
            ASSIGNED: self._names.tasks_assigned,
            RUNNING: self._names.tasks_running,
        }[state]
        pipe = self._redis.pipeline(transaction=False)
        for shard in range(TASK_SHARDS):
            pipe.zrange(index(shard), 0, limit - 1, withscores=True)
        found = [(_text(task), score) for reply in await pipe.execute() for task, score in reply]
        return sorted(found, key=lambda item: item[1])[:limit]

    async def expired(self, now: int, limit: int = 500) -> list[tuple[str, int, str]]:
        """(task, epoch, assignee) of assignments whose deadline passed."""
        pipe = self._redis.pipeline(transaction=False)
        for shard in range(TASK_SHARDS):
            pipe.zrangebyscore(self._names.tasks_assigned(shard), 0, now, start=0, num=limit)
        out = []
        for task in (_text(t) for reply in await pipe.execute() for t in reply):
            record = await self.get(task)
            if record and record["state"] == ASSIGNED:
                out.append((task, int(record["epoch"]), str(record.get("assignee", ""))))
        return out
