"""Every Redis key, Kafka topic and consumer-group name, derived from the settings in one place.

Redis Cluster hashes only the part of a key in `{...}`, and a script or command may touch keys of one
slot only, so the keys that meet carry the same tag:
- `{sN}`, stream shard N: the stream, the registry (`latest`), the agents' `fenced` and `assigned` hashes
  (the ingest's WRITE_SHARD script takes all four: a shard write is one round trip to one node) and the
  bridge's lease of the shard. An agent's fences and offers go to the shard its heartbeats go to.
- `{kN}`, task shard N (core/tasks.py): the tasks hash, each task's history and the state indexes, all
  changed in one script.
- Everything else is read and written one key per command, so it carries no tag and spreads by name.
The tags leave out the key prefix, so deployments (or tests) sharing a cluster share these slots.
"""

from __future__ import annotations

import dataclasses

from heartbeat_registry.core.settings import Settings


@dataclasses.dataclass(frozen=True)
class Names:
    key_prefix: str
    topic_prefix: str
    shards: int

    @classmethod
    def of(cls, settings: Settings) -> Names:
        return cls(settings.key_prefix, settings.topic_prefix, settings.stream_shards)

    # Redis
    def stream(self, shard: int) -> str:
        """Heartbeat batches of the agents of one shard (entries: field `b` = HeartbeatColumns)."""
        return f"{self.key_prefix}:{{s{shard}}}:stream"

    def latest(self, shard: int) -> str:
        """Hash agent_id -> latest heartbeat of that agent (value: core.views.RegistryEntry)."""
        return f"{self.key_prefix}:{{s{shard}}}:latest"

    def fenced(self, shard: int) -> str:
        """Hash agent_id -> 'task epoch;task epoch...': the tasks taken away from it (core.tasks)."""
        return f"{self.key_prefix}:{{s{shard}}}:fenced"

    def assigned(self, shard: int) -> str:
        """Hash agent_id -> 'task epoch deadline;...': tasks offered to the agent (core.tasks)."""
        return f"{self.key_prefix}:{{s{shard}}}:assigned"

    # the task registry (core/tasks.py): per task shard, one hash slot each
    def tasks(self, shard: int) -> str:
        """Hash task_id -> the task's record (JSON: owner, epoch, state, since, assignee, deadline)."""
        return f"{self.key_prefix}:{{k{shard}}}:tasks"

    def task_history(self, shard: int, task_id: str) -> str:
        """List of the task's changes (JSON), oldest first."""
        return f"{self.key_prefix}:{{k{shard}}}:history:{task_id}"

    def tasks_orphaned(self, shard: int) -> str:
        """Zset task_id -> since (ms): the shard's orphaned tasks."""
        return f"{self.key_prefix}:{{k{shard}}}:orphaned"

    def tasks_assigned(self, shard: int) -> str:
        """Zset task_id -> assignment deadline (ms): the shard's assigned tasks."""
        return f"{self.key_prefix}:{{k{shard}}}:assigned"

    def tasks_running(self, shard: int) -> str:
        """Zset task_id -> since (ms): the shard's tasks with a record that run again."""
        return f"{self.key_prefix}:{{k{shard}}}:running"

    def streams(self) -> list[str]:
        return [self.stream(i) for i in range(self.shards)]

    # the query store: what the processors publish for the query API
    def query_agents(self, partition: int) -> str:
        """Hash agent_id -> the worker's liveness view of the agent (core.views.AgentView), one per partition."""
        return f"{self.key_prefix}:q:agents:{partition}"

    def query_agents_of(self, agent_id: str, partitions: int) -> str:
        """The `query_agents` hash holding `agent_id`'s view: its partition's, of `partitions`."""
        return self.query_agents(partition_of(agent_id, partitions))

    def query_open(self, partition: int, window_start: int) -> str:
        """Hash agent_id -> the agent's window so far while it is open (core.views.WindowRow.encode_open)."""
        return f"{self.key_prefix}:q:open:{partition}:{window_start}"

    def query_windows(self, partition: int, window_start: int) -> str:
        """Hash agent_id -> the agent's closed window starting then (core.views.WindowRow)."""
        return f"{self.key_prefix}:q:win:{partition}:{window_start}"

    @property
    def query_timeline(self) -> str:
        """Zset of the fleet's state counts every 10 s over the last hour (JSON [time, counts...])."""
        return f"{self.key_prefix}:q:timeline"

    @property
    def tune_report(self) -> str:
        """String: the latest `hbreg tune` report page (self-contained HTML), served at /reports/tune."""
        return f"{self.key_prefix}:tune:report"

    @property
    def query_clock(self) -> str:
        """Hash partition -> that partition's clock at its last publish (core.views.PartitionClock)."""
        return f"{self.key_prefix}:q:clock"

    @property
    def alerts(self) -> str:
        """Hash alert key -> the alert (JSON: labels, annotations, starts, resolved): what Alertmanager is told."""
        return f"{self.key_prefix}:alerts"

    @property
    def alert_notifications(self) -> str:
        """List of the notifications Alertmanager delivered to our webhook receiver (JSON), newest first."""
        return f"{self.key_prefix}:alerts:notifications"

    def bridge_lease(self, unit: int) -> str:
        """String: the instance id of the bridge forwarding this unit (a shard, in the shard's slot), with a
        time to live (processors/shard_leases.py)."""
        return f"{self.key_prefix}:{{s{unit}}}:bridge-lease"

    @property
    def bridge_members(self) -> str:
        """Zset bridge instance id -> expiry (ms): the bridges alive, so each takes its share of the shards."""
        return f"{self.key_prefix}:bridges"

    @property
    def bridge_group(self) -> str:
        return f"{self.topic_prefix}bridge"

    # Kafka
    @property
    def heartbeats_topic(self) -> str:
        return f"{self.topic_prefix}heartbeats"

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}agent-events"

    @property
    def reassignments_topic(self) -> str:
        """Reassignment records, keyed by task_id: the contract with the Role Assignment service."""
        return f"{self.topic_prefix}task-reassignments"

    @property
    def processors_app_id(self) -> str:
        return f"{self.topic_prefix}hbreg-processors"

    @property
    def reassign_group(self) -> str:
        """The reassignment sink's consumer group on `agent-events` (and its transactional ids' prefix)."""
        return f"{self.topic_prefix}hbreg-reassign"

    @property
    def alerts_group(self) -> str:
        """The Alertmanager sink's consumer group on `agent-events`."""
        return f"{self.topic_prefix}hbreg-alerts"

    @property
    def assigner_group(self) -> str:
        """The reference Role Assignment service's consumer group on `task-reassignments`."""
        return f"{self.topic_prefix}hbreg-assigner"


_CACHE_LIMIT = 1 << 20
_caches: dict[int, dict[str, int]] = {}


def partition_of(agent_id: str, count: int) -> int:
    """Kafka's default partitioner (murmur2 of the key), so a record keyed by agent_id would land here.

    The ingest shards streams with it and the bridge picks Kafka partitions with it: an agent's
    heartbeats always travel one shard and one partition, in order. Cached in a plain dict because the
    fleet's agent ids repeat every beat, murmur2 is pure Python, and this runs once per heartbeat.
    """
    cache = _caches.get(count)
    if cache is None:
        cache = _caches[count] = {}
    found = cache.get(agent_id)
    if found is None:
        from aiokafka.partitioner import murmur2

        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        found = cache[agent_id] = (murmur2(agent_id.encode()) & 0x7FFFFFFF) % count
    return found
