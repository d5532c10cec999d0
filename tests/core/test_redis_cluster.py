"""Redis Cluster: every script's keys in one hash slot (pure), and the ingest on a real Valkey cluster of
three masters: its shards spread over them, a fresh client stores its first concurrent writes once, and
it follows a slot that moves while it runs (ASK during the migration, MOVED after it) and a failover."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import key_slot

from heartbeat_registry.core import redis_client, tasks
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tasks import TaskStore
from heartbeat_registry.core.views import RegistryEntry
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg import services
from heartbeat_registry.pb import hb, hb_grpc
from ingest import scripts
from ingest.server import Ingest
from ingest.writer import Batch
from processors import shard_leases
from tests import procs
from tests.conftest import form_cluster, make_settings
from tests.kafka_helpers import eventually

AGENTS = ["agent-1", "a{b}c", "{s1}", "}{", "host7/worker-3", "日本", "x" * 200] + [f"sim-{i:05d}" for i in range(500)]
TASKS = ["job-1", "t{k3}", "{", "job with spaces", "ü"] + [f"sim-{i:05d}-task-{i % 7}" for i in range(500)]
NAMES = [Names("hbreg", "", 8), Names("t0123456789", "x-", 3), Names("a.b-c_d", "", 1)]


def slots(keys: list[str]) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


def writer_keys(names: Names, agent: str) -> list[str]:
    """WRITE_SHARD's KEYS for the shard the ingest's writer puts `agent` in (scripts.py: stream, latest,
    fenced, assigned)."""
    batch = Batch(names.shards, 0)
    batch.add(agent, "", hb.RUNNING, 0, 0.0, None, 0)
    (shard,) = batch.shards
    return [names.stream(shard), names.latest(shard), names.fenced(shard), names.assigned(shard)]


@pytest.mark.parametrize("names", NAMES, ids=lambda n: f"{n.key_prefix}/{n.shards}")
def test_every_script_call_keeps_its_keys_in_one_slot(names: Names) -> None:
    store = TaskStore(aioredis.Redis(), names)  # never connects: only its key lists are used
    for agent in AGENTS:
        shard_keys = writer_keys(names, agent)
        assert len(slots(shard_keys)) == 1, shard_keys  # WRITE_SHARD
        # FENCE, OFFER, WITHDRAW write exactly the hashes WRITE_SHARD reads for that agent
        assert store._agent_keys(agent) == shard_keys[2:]
    for task in TASKS:
        keys = store._task_keys(task)  # ORPHAN, ASSIGN, CONFIRM, EXPIRE, NOTE
        assert len(keys) == 5 and len(slots(keys)) == 1, keys
    for unit in range(names.shards):  # the bridge's lease lives in its shard's slot
        assert slots([names.bridge_lease(unit)]) == slots([names.stream(unit)])


def test_the_slot_check_can_fail() -> None:
    """Positive control: keys without a shared tag do land in several slots."""
    names = NAMES[0]
    untagged = [names.query_agents(p) for p in range(8)] + [names.query_clock, names.alerts]
    assert len(slots(untagged)) > 1
    assert len(slots([names.stream(0), names.stream(1)])) == 2


SCRIPTS = {
    "WRITE_SHARD": scripts.WRITE_SHARD,
    **{name: getattr(tasks, name) for name in ("ORPHAN", "ASSIGN", "CONFIRM", "EXPIRE", "NOTE")},
    **{name: getattr(tasks, name) for name in ("FENCE", "OFFER", "WITHDRAW")},
    "lease renew": shard_leases._RENEW,
    "lease release": shard_leases._RELEASE,
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_scripts_touch_only_the_keys_passed_in_keys(name: str) -> None:
    """A key built inside a script (from ARGV, or by concatenation) is invisible to the cluster's routing."""
    source = SCRIPTS[name]
    touched = re.findall(r"redis\.call\('\w+',\s*([^,)]+)", source)
    assert touched, "no redis.call found: the pattern no longer matches the scripts"
    helper_args = re.findall(r"\b(?:entries|put)\(([^,)]+)", source)
    for arg in touched:
        assert re.fullmatch(r"KEYS\[\d+\]|key", arg.strip()), f"{name}: redis.call on {arg!r}"
    for arg in helper_args:
        assert re.fullmatch(r"KEYS\[\d+\]|key", arg.strip()), f"{name}: helper called on {arg!r}"


def test_connect_picks_the_client_by_the_setting() -> None:
    single = Settings(redis_url="redis://127.0.0.1:1")
    assert type(redis_client.connect(single)) is aioredis.Redis
    assert type(redis_client.connect(single, cluster=True)).__name__ == "RedisCluster"
    clustered = Settings(redis_url="redis://127.0.0.1:1", redis_cluster=True)
    assert isinstance(redis_client.connect(clustered), aioredis.RedisCluster)
    assert type(redis_client.connect_sync("redis://127.0.0.1:1")) is redis.Redis
    with pytest.raises(ConfigError, match="HBREG_REDIS_CLUSTER=on needs a redis:// or rediss:// seed node"):
        redis_client.connect(Settings(redis_url="unix:///tmp/redis.sock", redis_cluster=True))
    with pytest.raises(ConfigError, match="HBREG_REDIS_URL is not set"):
        redis_client.connect(Settings(redis_cluster=True))


def test_a_cluster_switch_without_a_usable_seed_is_one_line_and_exit_2(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HBREG_")}
    env.update(HBREG_STATE_DIR=str(tmp_path / "state"), HBREG_REDIS_CLUSTER="on")
    up = subprocess.run(hbreg_argv("up"), env=env, capture_output=True, text=True, timeout=60)
    assert (up.returncode, up.stderr.strip()) == (
        2,
        "hbreg: HBREG_REDIS_CLUSTER=on needs HBREG_REDIS_URL (a node of the cluster): `hbreg up` embeds one Valkey",
    )
    env.update(
        HBREG_REDIS_URL="unix:///tmp/valkey.sock",
        HBREG_AUTH="off",
        HBREG_GRPC_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_INGEST_METRICS_ADDR=f"127.0.0.1:{services.free_port()}",
    )
    ingest = subprocess.run(hbreg_argv("ingest"), env=env, capture_output=True, text=True, timeout=60)
    assert ingest.returncode == 2
    assert ingest.stderr.strip() == (
        "hbreg: HBREG_REDIS_CLUSTER=on needs a redis:// or rediss:// seed node, got 'unix:///tmp/valkey.sock'"
    )


def hbreg_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "heartbeat_registry", *args]


# --- on the real cluster -------------------------------------------------------------------------------

ON_CLUSTER = pytest.mark.parametrize("redis_backend", ["cluster"])


def owner_of(node: redis.Redis, slot: int) -> int:
    """The port of the master serving `slot`, as `node` sees the slot map."""
    for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return int(primary[1])
    raise AssertionError(f"slot {slot} is not served")


class Nodes:
    """Direct (non-cluster) clients to each master, to see where keys really are and to move a slot."""

    def __init__(self, settings: Settings) -> None:
        seed = redis_client.connect_sync(settings)  # the blocking cluster client reads the map at once
        assert isinstance(seed, redis.cluster.RedisCluster)
        try:
            self.ports = sorted(node.port for node in seed.get_primaries())
        finally:
            seed.close()
        self.clients = {p: redis.Redis(host="127.0.0.1", port=p) for p in self.ports}
        self.ids = {p: c.execute_command("CLUSTER", "MYID").decode() for p, c in self.clients.items()}

    def owner(self, slot: int, asked: int | None = None) -> int:
        """The master serving `slot`, as the node `asked` (default: the first) sees the map."""
        return owner_of(self.clients[asked or self.ports[0]], slot)

    def keys(self, port: int, prefix: str) -> set[bytes]:
        return set(self.clients[port].scan_iter(match=f"{prefix}:*", count=1000))

    def start_move(self, slot: int, source: int, target: int) -> None:
        """IMPORTING/MIGRATING, then every key of the slot moved: the source now answers ASK for them."""
        self.clients[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[source])
        self.clients[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[target])
        while keys := self.clients[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            self.clients[source].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)

    def finish_move(self, slot: int, target: int) -> None:
        """The slot belongs to the target on every node: the others answer MOVED."""
        for port in [target] + [p for p in self.ports if p != target]:
            self.clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[target])
        deadline = time.monotonic() + 10
        while any(self.owner(slot, asked=port) != target for port in self.ports):
            assert time.monotonic() < deadline, f"slot {slot} not moved to {target} everywhere"
            time.sleep(0.05)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def beat(agent: str, cpu: float) -> hb.Heartbeat:
    return hb.Heartbeat(agent_id=agent, task_id="t", status=hb.RUNNING, timestamp=int(time.time() * 1000), cpu_util=cpu)


@ON_CLUSTER
async def test_the_shards_spread_over_the_masters_and_scan_sees_them_all(settings: Settings) -> None:
    nodes = Nodes(settings)
    ingest = Ingest(settings)
    await ingest.start()
    try:
        batch = ingest.writer.batch(int(time.time() * 1000))
        for i in range(200):
            batch.add(f"agent-{i}", "t", hb.RUNNING, int(time.time() * 1000), 0.5, None, 1)
        await ingest.writer.write(batch)
        per_node = {port: nodes.keys(port, settings.key_prefix) for port in nodes.ports}
        # 8 shards' streams and registries: slots of {s0}..{s7} fall on every one of the three masters
        assert all(per_node.values()), {p: len(k) for p, k in per_node.items()}
        client = redis_client.connect(settings)
        try:
            everywhere = {k async for k in client.scan_iter(match=f"{settings.key_prefix}:*")}
        finally:
            await client.aclose()
        assert everywhere == set().union(*per_node.values())
        assert len(everywhere) == 2 * settings.stream_shards  # a stream and a registry hash per shard
    finally:
        await ingest.stop()
        nodes.close()


@ON_CLUSTER
async def test_a_fresh_ingest_stores_its_first_concurrent_writes_exactly_once(settings: Settings) -> None:
    """A fresh cluster client sends what comes before its first map read to one node; the MOVED replies
    that draws must not make it close connections under in-flight writes (redis_client's
    reinitialize_steps): those writes were retried and stored twice, or a shard's writer died. Before
    that setting, 3 of 8 such rounds went wrong."""
    for round_ in range(5):
        fresh = dataclasses.replace(settings, key_prefix=f"{settings.key_prefix}r{round_}")
        ingest = Ingest(fresh)
        await ingest.start()
        try:
            now = int(time.time() * 1000)
            batches = []
            for i in range(300):
                batch = ingest.writer.batch(now)
                batch.add(f"agent-{i}", "t", hb.RUNNING, now, 0.5, None, i + 1)
                batches.append(batch)
            await asyncio.wait_for(asyncio.gather(*(ingest.writer.write(b) for b in batches)), 20)
        finally:
            await ingest.stop()
        client = redis_client.connect(fresh)
        try:
            agents = [
                agent
                for stream in Names.of(fresh).streams()
                for _, fields in await client.xrange(stream)
                for agent in hb.HeartbeatColumns.FromString(fields[b"b"]).agent_id
            ]
        finally:
            await client.aclose()
        assert sorted(agents) == sorted(f"agent-{i}" for i in range(300)), f"round {round_}"


@ON_CLUSTER
async def test_the_ingest_follows_a_slot_moved_while_it_runs(settings: Settings) -> None:
    """The ingest's long-lived client learned the slot map at its first write; then its agent's shard slot
    moves to another master. Mid-migration (the old owner answers ASK) a heartbeat is either acknowledged
    and stored on the new owner, or refused UNAVAILABLE (the agent retries): redis-py's asyncio cluster
    client may send ASKING and the command on two pooled connections, and then gives up ("TTL
    exhausted"). Once the slot has moved (the old owner answers MOVED) every heartbeat is acknowledged and
    lands in the shard's stream and registry on the new owner."""
    names = Names.of(settings)
    nodes = Nodes(settings)
    agent = "mover"
    stream, latest = writer_keys(names, agent)[:2]
    slot = key_slot(stream.encode())
    source = nodes.owner(slot)
    target = next(p for p in nodes.ports if p != source)
    ingest = Ingest(settings)
    await ingest.start()
    moved = False
    try:
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            acked = [(await stub.Beat(beat(agent, 0.1))).received_ms]
            assert nodes.clients[source].xlen(stream) == 1  # positive control: the shard is on `source`

            nodes.start_move(slot, source, target)
            moved = True
            with pytest.raises(redis.exceptions.AskError):  # the keys moved; the slot is still the source's
                nodes.clients[source].xlen(stream)
            try:
                acked.append((await stub.Beat(beat(agent, 0.2))).received_ms)
            except grpc.aio.AioRpcError as refused:
                assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused

            nodes.finish_move(slot, target)
            with pytest.raises(redis.exceptions.MovedError):
                nodes.clients[source].xlen(stream)
            await eventually(lambda: ingest.writer.available, timeout=5)  # after a refusal: Redis answers again
            for cpu in (0.3, 0.4):
                acked.append((await stub.Beat(beat(agent, cpu))).received_ms)

        on_target = nodes.clients[target]
        stored = [
            received
            for _, fields in on_target.xrange(stream)
            for cols in [hb.HeartbeatColumns.FromString(fields[b"b"])]
            for a, received in zip(cols.agent_id, cols.received_ms, strict=True)
            if a == agent
        ]
        assert stored == acked, "an acknowledged heartbeat is missing, or a refused one was stored"
        entry = RegistryEntry.decode(agent, on_target.hget(latest, agent))
        assert entry.last_seen_ms == acked[-1] and entry.cpu_util == pytest.approx(0.4)
    finally:
        await ingest.stop()
        if moved:  # complete the move if it broke off, then give the slot back: the session's layout stays
            nodes.finish_move(slot, target)
            nodes.start_move(slot, target, source)
            nodes.finish_move(slot, source)
        nodes.close()


async def test_the_ingest_carries_on_after_a_failover(valkey_cluster_nodes, tmp_path, prefix: str) -> None:
    """The master of the agent's shard dies and its replica takes its slots over (node timeout 2 s). The
    ingest's client, which knew the old master, reads the map again: heartbeats are refused UNAVAILABLE
    for the seconds the failover takes (agents retry), then acknowledged and stored on the promoted replica,
    which also holds what was replicated before."""
    nodes = valkey_cluster_nodes
    *masters, (_, replica_port, _) = nodes
    direct = {port: redis.Redis(host="127.0.0.1", port=port) for _, port, _ in nodes}
    ingest = None
    try:
        form_cluster([port for _, port, _ in masters], [bus for _, _, bus in masters])
        settings = make_settings(
            tmp_path, prefix, redis_url=f"redis://127.0.0.1:{masters[0][1]}", redis_cluster=True, stream_shards=4
        )
        ids = {port: c.execute_command("CLUSTER", "MYID").decode() for port, c in direct.items()}
        seed = direct[masters[0][1]]
        names = Names.of(settings)
        # an agent whose shard is not on the seed node (the clients must keep a live node to read the map from)
        agent = next(
            a
            for a in (f"fo-{i}" for i in range(100))
            if owner_of(seed, key_slot(writer_keys(names, a)[0].encode())) != masters[0][1]
        )
        stream, latest = writer_keys(names, agent)[:2]
        slot = key_slot(stream.encode())
        victim = owner_of(seed, slot)
        direct[replica_port].execute_command("CLUSTER", "MEET", "127.0.0.1", masters[0][1], masters[0][2])
        await eventually(lambda: ids[victim] in direct[replica_port].execute_command("CLUSTER", "NODES").decode(), 10)
        direct[replica_port].execute_command("CLUSTER", "REPLICATE", ids[victim])
        await eventually(lambda: direct[replica_port].info("replication")["master_link_status"] == "up", 15)

        ingest = Ingest(settings)
        await ingest.start()
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            before = (await stub.Beat(beat(agent, 0.1))).received_ms
            assert direct[victim].execute_command("WAIT", 1, 2000) == 1  # replicated before the master dies
            # and its fork for the replica's full sync is gone (killed first, it would outlive its parent)
            await eventually(lambda: direct[victim].info("persistence")["rdb_bgsave_in_progress"] == 0, 10)
            procs.stop(next(proc for proc, port, _ in nodes if port == victim), signal.SIGKILL)
            killed_at = time.monotonic()
            refused, after = 0, None
            while after is None:
                assert time.monotonic() - killed_at < 30, f"no heartbeat acknowledged 30 s after the kill ({refused})"
                try:
                    after = (await stub.Beat(beat(agent, 0.2))).received_ms
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    refused += 1
                    await asyncio.sleep(0.2)
            took = time.monotonic() - killed_at
        assert owner_of(seed, slot) == replica_port, "the replica did not take over"
        stored = [
            received
            for _, fields in direct[replica_port].xrange(stream)
            for cols in [hb.HeartbeatColumns.FromString(fields[b"b"])]
            for a, received in zip(cols.agent_id, cols.received_ms, strict=True)
            if a == agent
        ]
        assert stored == [before, after]
        assert RegistryEntry.decode(agent, direct[replica_port].hget(latest, agent)).last_seen_ms == after
        assert took < 20, f"writes came back {took:.1f} s after the kill"
    finally:
        if ingest is not None:
            await ingest.stop()
        for client in direct.values():
            client.close()
