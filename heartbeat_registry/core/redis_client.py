"""The one place that makes Redis clients, so that every process talks to one Redis or to a Redis Cluster
alike (`HBREG_REDIS_CLUSTER`).

In cluster mode `HBREG_REDIS_URL` names a seed node: redis-py's cluster client reads the slot map from it,
finds the other nodes there, sends each command to the node that owns its key's slot, follows MOVED (and
ASK, with a limit the README's "Redis Cluster" states) redirections, and after a connection error or a
failover reads the map again and retries. It has the
same command methods as the single-node client, which is why callers type it as `Redis`. What it cannot
do is what this project never asks for: one command or script over keys of several slots (CROSSSLOT) and
transactions (its pipelines are split by node, never atomic). Keys that meet in one script share a hash
tag (core/names.py says which).
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.cluster

from heartbeat_registry.core.settings import PREFIX, Settings
from heartbeat_registry.errors import ConfigError

# the single-node client's option that the cluster client has no use for: it retries (and re-reads the
# slot map) on connection errors and timeouts by its own policy, which is what carries it over a failover
_SINGLE_NODE_ONLY = ("retry_on_timeout",)
# A MOVED reply only patches that slot in the client's map, never makes it re-read the whole map (by
# default every 5th MOVED does). Measured with redis-py 8.1: a fresh asyncio client sends the commands
# issued before its first map read to one node, so the ingest's first concurrent shard writes draw several
# MOVED at once, and the re-read that follows closes every connection, in-flight writes among them. In 8
# runs of 300 concurrent writes on a fresh client, 2 stored 340 and 376 heartbeats (retried writes, twice)
# and in 1 a shard's writer died on a closed connection; with this setting, 8 of 8 stored exactly 300. A
# lost node or a failover still makes it re-read the map (connection errors, CLUSTERDOWN).
_CLUSTER_DEFAULTS: dict[str, Any] = {"reinitialize_steps": 0}


def _target(target: Settings | str, cluster: bool | None) -> tuple[str, bool]:
    """The URL and the mode: from the settings (HBREG_REDIS_URL, HBREG_REDIS_CLUSTER), or a URL (single
    node unless `cluster` says otherwise)."""
    if isinstance(target, Settings):
        target.require("redis_url")
        assert target.redis_url is not None
        url, mode = target.redis_url, target.redis_cluster
    else:
        url, mode = target, False
    mode = mode if cluster is None else cluster
    if mode and not url.startswith(("redis://", "rediss://")):
        raise ConfigError(f"{PREFIX}REDIS_CLUSTER=on needs a redis:// or rediss:// seed node, got {url!r}")
    return url, mode


def _cluster_options(options: dict[str, Any]) -> dict[str, Any]:
    return {**_CLUSTER_DEFAULTS, **{k: v for k, v in options.items() if k not in _SINGLE_NODE_ONLY}}


def connect(target: Settings | str, cluster: bool | None = None, **options: Any) -> aioredis.Redis:
    """An asyncio client: `redis.asyncio.Redis`, or `redis.asyncio.RedisCluster` in cluster mode (typed as
    Redis: same commands). `options` are the client's (timeouts, pool size)."""
    url, mode = _target(target, cluster)
    if mode:
        return cast(aioredis.Redis, aioredis.RedisCluster.from_url(url, **_cluster_options(options)))
    return aioredis.Redis.from_url(url, **options)


async def close_idle(client: aioredis.Redis) -> None:
    """Close the connections `client` keeps idle; call it when one of its calls failed with a
    ConnectionError. The idle ones were opened before the same restart or reset of Redis, and redis-py 8's
    single-node pool hands each out once more, to fail one more call (measured: after a restart of
    Valkey, 30 of 30 idle connections did); closed, they connect afresh when next taken. The cluster
    client does this itself on a connection error (each node's free connections), so it has no pool here."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        # never raises: its callers are handling a failure already (a closing error is a closed socket)
        with contextlib.suppress(Exception):
            await pool.disconnect(inuse_connections=False)


def connect_sync(target: Settings | str, cluster: bool | None = None, **options: Any) -> redis.Redis:
    """The same for blocking code (tools that write once and exit)."""
    url, mode = _target(target, cluster)
    if mode:
        return cast(redis.Redis, redis.cluster.RedisCluster.from_url(url, **_cluster_options(options)))
    return redis.Redis.from_url(url, **options)
