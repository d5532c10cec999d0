"""Real services for the whole test session: one Valkey and one Apache Kafka broker (KRaft), started
once on free ports with data in a temp dir. Tests isolate themselves by key and topic prefix.

A missing binary is an error, not a silent skip: the Kafka broker is required, and every other
optional binary (Tansu) fails the run when CI=true.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services
from tests import procs

SERVICE_FIXTURES = {"valkey_url", "valkey_cluster_url", "valkey_cluster_nodes", "kafka_bootstrap", "tansu_bootstrap"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`unit`: what needs no real service (`make unit` runs only those)."""
    for item in items:
        uses = set(getattr(item, "fixturenames", ())) & SERVICE_FIXTURES
        if not uses and item.get_closest_marker("kafka") is None:
            item.add_marker(pytest.mark.unit)


def require_binary(available: bool, what: str) -> None:
    """Skip loudly where a system binary is missing; in CI that skip fails the run."""
    if available:
        return
    message = f"MISSING BINARY: {what}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " (CI=true: missing binaries fail the run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = services.free_port()
    proc = subprocess.Popen(
        services.valkey_command(port, tmp_path_factory.mktemp("valkey"), durable=False),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        services.wait_port("127.0.0.1", port, 15, "valkey")
        yield f"redis://127.0.0.1:{port}"
    finally:
        procs.stop(proc)


CLUSTER_SLOTS = 16384
# the core pipeline tests run once per Redis: `pytestmark = [..., BOTH_REDIS]` in their module
BOTH_REDIS = pytest.mark.parametrize("redis_backend", ["single", "cluster"])


def form_cluster(ports: list[int], bus_ports: list[int], timeout: float = 30.0) -> None:
    """Slots split in equal ranges over the nodes, then they meet; returns once every node reports the
    cluster ok and knows the whole slot map (no valkey-cli in the wheel: this is what `--cluster create`
    does, without replicas)."""
    clients = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
    try:
        bounds = [CLUSTER_SLOTS * i // len(ports) for i in range(len(ports) + 1)]
        for client, low, high in zip(clients, bounds[:-1], bounds[1:], strict=True):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high - 1)
        for port, bus in zip(ports[1:], bus_ports[1:], strict=True):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        deadline = time.monotonic() + timeout
        while True:
            infos = [client.cluster("INFO") for client in clients]
            if all(
                i["cluster_state"] == "ok"
                and int(i["cluster_known_nodes"]) == len(ports)
                and int(i["cluster_slots_ok"]) == CLUSTER_SLOTS
                for i in infos
            ) and all(len(client.execute_command("CLUSTER", "SLOTS")) == len(ports) for client in clients):
                return
            assert time.monotonic() < deadline, f"the Valkey cluster did not form within {timeout:.0f} s: {infos}"
            time.sleep(0.1)
    finally:
        for client in clients:
            client.close()


def start_cluster_nodes(
    tmp_path_factory: pytest.TempPathFactory, count: int
) -> list[tuple[subprocess.Popen, int, int]]:
    """`count` Valkey processes with cluster mode on, not yet in a cluster: (process, port, bus port)."""
    nodes = []
    try:
        for _ in range(count):
            port, bus = services.free_port(), services.free_port()
            data = tmp_path_factory.mktemp("valkey-cluster")
            command = services.valkey_command(port, data, durable=False) + [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(data / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                str(bus),
            ]
            nodes.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, bus))
        for _, port, _ in nodes:
            services.wait_port("127.0.0.1", port, 15, "valkey cluster node")
    except BaseException:
        for proc, _, _ in nodes:
            procs.stop(proc)
        raise
    return nodes


@pytest.fixture(scope="session")
def valkey_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three Valkey masters forming one Redis Cluster (slots split in thirds, no replicas); the URL of the
    first is the seed node the clients discover the others from."""
    nodes = start_cluster_nodes(tmp_path_factory, 3)
    try:
        form_cluster([port for _, port, _ in nodes], [bus for _, _, bus in nodes])
        yield f"redis://127.0.0.1:{nodes[0][1]}"
    finally:
        for proc, _, _ in nodes:
            procs.stop(proc)


@pytest.fixture
def valkey_cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[subprocess.Popen, int, int]]]:
    """Four cluster-enabled Valkey processes of the test's own, in no cluster yet, for a test that kills
    one (the session's cluster must stay whole): (process, port, bus port)."""
    nodes = start_cluster_nodes(tmp_path_factory, 4)
    try:
        yield nodes
    finally:
        for proc, _, _ in nodes:
            procs.stop(proc)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not services.kafka_available():
        pytest.fail(f"the tests need the real Apache Kafka broker, but {services.why_not_kafka()}")
    port = services.free_port()
    data = tmp_path_factory.mktemp("kafka")
    log = open(data / "broker.log", "wb")  # noqa: SIM115 - open for the whole session
    proc = subprocess.Popen(services.kafka_command(port, data), stdout=log, stderr=subprocess.STDOUT)
    try:
        services.wait_port("127.0.0.1", port, 60, "kafka")
        yield f"127.0.0.1:{port}"
    finally:
        procs.stop(proc)
        log.close()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


def make_settings(tmp_path, prefix: str, **values) -> Settings:
    return Settings(
        grpc_addr=f"127.0.0.1:{services.free_port()}",
        key_prefix=prefix,
        topic_prefix=prefix + "-",
        state_dir=tmp_path / "state",
        ingest_metrics_addr=f"127.0.0.1:{services.free_port()}",
        bridge_metrics_addr=f"127.0.0.1:{services.free_port()}",
        worker_web_addr=f"127.0.0.1:{services.free_port()}",
        reassign_metrics_addr=f"127.0.0.1:{services.free_port()}",
        assigner_metrics_addr=f"127.0.0.1:{services.free_port()}",
        alerts_metrics_addr=f"127.0.0.1:{services.free_port()}",
        http_addr=f"127.0.0.1:{services.free_port()}",
        **{"auth": False, "rate_limit": 10_000.0, "rate_burst": 10_000.0, **values},
    )


@pytest.fixture
def redis_backend() -> str:
    """Which Redis `settings` point at: "single" (the session's Valkey), or "cluster" (the Valkey cluster)
    where a module parametrizes it (BOTH_REDIS)."""
    return "single"


@pytest.fixture
def settings(tmp_path, prefix: str, valkey_url: str, redis_backend: str, request: pytest.FixtureRequest) -> Settings:
    """Redis only; tests that need Kafka use `pipeline_settings`."""
    if redis_backend == "cluster":
        return make_settings(
            tmp_path, prefix, redis_url=request.getfixturevalue("valkey_cluster_url"), redis_cluster=True
        )
    return make_settings(tmp_path, prefix, redis_url=valkey_url)


@pytest.fixture
def pipeline_settings(settings: Settings, kafka_bootstrap: str) -> Settings:
    return dataclasses.replace(
        settings, kafka_bootstrap=kafka_bootstrap, topic_partitions=4, stream_shards=4, stall_timeout=2.0
    )


def awaiting(coro: object) -> list[str]:
    """Where a coroutine waits: its chain of awaits, outermost first."""
    chain = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rpartition('/')[2]}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return chain


@pytest.fixture(autouse=True)
async def hung_test_report(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test still running shortly before pytest-timeout stops it prints where each of its coroutines
    waits: the timeout's own traceback shows only the event loop's select()."""
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(request.config.getini("timeout") or 0)

    async def report() -> None:
        await asyncio.sleep(max(1.0, limit - 15))
        print(f"\n--- {request.node.nodeid} still running after {limit - 15:.0f} s; its coroutines:", file=sys.stderr)
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                print(f"  {task.get_name()}: {' -> '.join(awaiting(task.get_coro()))}", file=sys.stderr)

    watchdog = asyncio.create_task(report()) if limit > 15 else None
    yield
    if watchdog is not None:
        watchdog.cancel()
