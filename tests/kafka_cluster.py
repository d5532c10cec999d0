"""A three-node Apache Kafka cluster (KRaft, each node broker + controller) from the same jars as the
session's single broker, for the tests of replication: started only by the tests that ask for it,
because three JVMs on two cores are heavy.
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import subprocess
import time
from typing import IO

from aiokafka.admin import AIOKafkaAdminClient

from heartbeat_registry.hbreg import services


class KafkaCluster:
    """Nodes 1..n on free ports; `kill(node)` takes one away the hard way (SIGKILL)."""

    def __init__(self, data_dir: pathlib.Path, nodes: int = 3) -> None:
        self.ports = [services.free_port() for _ in range(nodes)]
        controller_ports = [services.free_port() for _ in range(nodes)]
        commands = services.kafka_cluster_commands(self.ports, controller_ports, data_dir)
        self.logs: list[IO[bytes]] = [open(data_dir / f"node{n}.log", "wb") for n in self.nodes]  # noqa: SIM115
        self.procs = [
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            for command, log in zip(commands, self.logs, strict=True)
        ]

    @property
    def nodes(self) -> list[int]:
        return list(range(1, len(self.ports) + 1))

    def alive(self) -> list[int]:
        return [n for n in self.nodes if self.procs[n - 1].poll() is None]

    @property
    def bootstrap(self) -> str:
        """Every node, as a client configured for the whole cluster would list them."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def bootstrap_of(self, nodes: list[int]) -> str:
        return ",".join(f"127.0.0.1:{self.ports[n - 1]}" for n in nodes)

    async def wait_ready(self, timeout: float = 90.0) -> None:
        """Until every node answers and has registered as a broker with the controller quorum."""
        deadline = time.monotonic() + timeout
        for port in self.ports:
            await asyncio.to_thread(services.wait_port, "127.0.0.1", port, timeout, "kafka node")
        while True:
            dead = [n for n in self.nodes if self.procs[n - 1].poll() is not None]
            assert not dead, f"kafka nodes {dead} exited while starting (see their logs)"
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
            try:
                await admin.start()
                brokers = (await admin.describe_cluster())["brokers"]
                if len(brokers) == len(self.ports):
                    return
            except Exception:  # a node still starting refuses or times out: ask again
                if time.monotonic() > deadline:
                    raise
            finally:
                await admin.close()
            assert time.monotonic() < deadline, f"{len(self.ports)} brokers did not register within {timeout} s"
            await asyncio.sleep(0.3)

    def kill(self, node: int) -> None:
        """SIGKILL: no controlled shutdown, no leadership handed over, unflushed page cache is the OS's."""
        proc = self.procs[node - 1]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


async def describe(bootstrap: str, topics: list[str]) -> dict[str, list[dict]]:
    """topic -> its partitions as the metadata has them (`partition`, `leader`, `replicas`, `isr`)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        found = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {d["topic"]: sorted(d["partitions"], key=lambda p: p["partition"]) for d in found}
