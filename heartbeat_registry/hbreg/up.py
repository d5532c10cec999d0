"""`hbreg up`: runs every process of the Procfile (Valkey and Kafka only when no Redis or Kafka is
configured, the reference assigner unless HBREG_ASSIGNER=off), prints where each listens, stops them all.

Children run in their own sessions (a Ctrl-C reaches only this supervisor, which then stops them in
reverse order so the ingest drains before Redis goes) and get SIGTERM from the kernel if the
supervisor itself dies, so no process is left behind.

Stopping never depends on the terminal: `hbreg up | tee log` and Ctrl-C kills `tee` too, and from then on
every write to stdout fails. Output goes through `Console`, which drops it once stdout is gone, and the
children's output is still drained (a child blocked on a full pipe could not shut down).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import lifecycle, state
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.errors import ConfigError, ServiceError
from heartbeat_registry.hbreg import services

PROCFILE = services.PROJECT_ROOT / "Procfile"
STOP_TIMEOUT = 20.0
# the processes that may run as several replicas, and the setting each replica needs of its own
# (query replicas share the HTTP port, ingest replicas the gRPC port: SO_REUSEPORT)
REPLICABLE = {
    "ingest": "ingest_metrics_addr",
    "bridge": "bridge_metrics_addr",
    "worker": "worker_web_addr",
    "query": None,
    "reassign": "reassign_metrics_addr",
    "assigner": "assigner_metrics_addr",
    "alerter": "alerts_metrics_addr",
}
# the processes that consume in a Kafka consumer group, each replica under a stable name (HBREG_INSTANCE)
GROUP_MEMBERS = ("worker", "reassign", "alerter", "assigner")
START_TIMEOUT = 60.0
# Valkey warns at every start that vm.overcommit_memory is off; that matters only for the fork of a
# background save under memory pressure, which the embedded Valkey of one laptop never meets.
_NOISE = (b"Memory overcommit must be enabled",)


class Console:
    """stdout that may go away (a closed pipe): after the first failed write, output is dropped."""

    def __init__(self) -> None:
        self.gone = sys.stdout is None

    def write(self, text: str) -> None:
        if self.gone:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (OSError, ValueError):  # a closed pipe, or a closed file
            self.gone = True
            lifecycle.silence_stdout()

    def say(self, text: str) -> None:
        self.write(text + "\n")


def parse_replicas(text: str) -> dict[str, int]:
    """`ingest=2,bridge=2,...` -> counts; one line naming the problem otherwise."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--replicas {part!r}: expected NAME=COUNT with a count of at least 1")
        if name.strip() not in REPLICABLE:
            raise ConfigError(f"--replicas {part!r}: {name.strip()!r} is not one of {', '.join(REPLICABLE)}")
        counts[name.strip()] = int(value)
    return counts


def read_procfile(path: pathlib.Path = PROCFILE) -> dict[str, list[str]]:
    procs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, command = line.partition(":")
        procs[name.strip()] = shlex.split(command)
    return procs


def _argv(command: list[str]) -> list[str]:
    """`hbreg ...` runs with this interpreter, whether or not the venv's bin is on PATH."""
    if command and command[0] == "hbreg":
        return [sys.executable, "-m", "heartbeat_registry", *command[1:]]
    return command


@dataclasses.dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    pump: asyncio.Task
    argv: list[str]
    env: dict[str, str]


async def _pump(name: str, stream: asyncio.StreamReader, width: int, console: Console) -> None:
    """The child's output, prefixed with its name; drained to the end whatever became of stdout (a child
    blocked on a full pipe could not shut down)."""
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line longer than the reader's limit: pass it on in pieces
            line = await stream.read(65536)
        if not line:
            return
        if not any(noise in line for noise in _NOISE):
            console.write(f"{name:<{width}} | {line.decode(errors='replace')}")


class Supervisor:
    def __init__(self, env: dict[str, str], console: Console) -> None:
        self.env = env
        self.console = console
        self.children: list[Child] = []
        self.width = 8

    async def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**self.env, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lifecycle.die_with_parent,
        )
        assert proc.stdout is not None
        child = Child(
            name, proc, asyncio.create_task(_pump(name, proc.stdout, self.width, self.console)), argv, env or {}
        )
        self.children.append(child)
        return child

    async def restart(self, child: Child) -> Child:
        """Start `child`'s command again in its place (a replica that died)."""
        await asyncio.gather(child.pump, return_exceptions=True)
        self.children.remove(child)
        return await self.start(child.name, child.argv, child.env)

    async def wait_ready(self, child: Child, addr: str, what: str) -> None:
        host, _, port = addr.rpartition(":")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if child.proc.returncode is not None:
                raise ServiceError(f"{what} exited with code {child.proc.returncode} during start-up")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 0.5)
                writer.close()
                return
            except (TimeoutError, OSError):
                await asyncio.sleep(0.1)
        raise ServiceError(f"{what} did not listen on {addr} within {START_TIMEOUT:.0f} s")

    async def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.proc.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    self.console.say(f"hbreg: {child.name} did not stop within {STOP_TIMEOUT:.0f} s: killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
                    await child.proc.wait()
            await asyncio.gather(child.pump, return_exceptions=True)


async def _watch(
    sup: Supervisor, stop: asyncio.Event, stopper: asyncio.Task, counts: dict[str, int], record: Callable[[], None]
) -> int:
    """Until a stop signal: a replica that exits is started again (its siblings serve meanwhile); any
    other process that exits stops the system, with exit code 1."""
    while True:
        waiters = {asyncio.create_task(c.proc.wait()): c for c in sup.children}
        done, _ = await asyncio.wait({stopper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        for task in waiters:
            task.cancel()
        if stop.is_set():
            return 0
        for task in done:
            crashed = waiters[task]
            code = crashed.proc.returncode
            if counts.get(crashed.name.partition(".")[0], 1) < 2:
                sup.console.say(f"hbreg: {crashed.name} exited with code {code}; stopping")
                return 1
            sup.console.say(f"hbreg: {crashed.name} exited with code {code}; restarting it (its replicas serve)")
            await asyncio.sleep(1.0)
            await sup.restart(crashed)
            record()


def _replica(name: str, index: int, command: list[str], settings: Settings) -> tuple[list[str], dict[str, str], str]:
    """The command, environment and ready address of replica `index` (0-based) of process `name`: the
    first uses the configured addresses, the others free ports of their own."""
    env: dict[str, str] = {}
    if name == "ingest":
        env["HBREG_INGEST_PROCESSES"] = "1"  # each replica is one process of its own here
    if name == "bridge":
        command = [*command, "--name", f"bridge-{index + 1}"]
    if name in GROUP_MEMBERS and not settings.instance:
        env["HBREG_INSTANCE"] = f"{name}-{index + 1}"  # restarted, it takes its partitions back at once
    var = REPLICABLE.get(name)
    addr = getattr(settings, var) if var else settings.http_addr
    if var and index:
        addr = f"{addr.rpartition(':')[0]}:{services.free_port()}"
        env["HBREG_" + var.upper()] = addr
    return command, env, addr


async def up(
    settings: Settings, demo: int = 0, demo_stall_fraction: float = 0.15, replicas: dict[str, int] | None = None
) -> int:
    """Start everything, wait for a signal or a crash, stop everything. Returns the exit code.

    `replicas`: how many of each process (ingest: HBREG_INGEST_PROCESSES unless given here)."""
    counts = {"ingest": settings.ingest_processes, **(replicas or {})}
    running = state.read(settings.state_dir)
    if running:
        raise ServiceError(
            f"hbreg up is already running (pid {running['pid']}, state {state.path(settings.state_dir)})"
        )
    run_dir = settings.state_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    procs = read_procfile()
    stop = lifecycle.stop_signal()
    console = Console()

    embedded_redis = settings.redis_url is None
    if embedded_redis and settings.redis_cluster:
        raise ConfigError(
            "HBREG_REDIS_CLUSTER=on needs HBREG_REDIS_URL (a node of the cluster): `hbreg up` embeds one Valkey"
        )
    embedded_kafka = settings.kafka_bootstrap is None
    broker = "external"
    changes: dict[str, object] = {}
    if embedded_redis:
        changes["redis_url"] = f"redis://127.0.0.1:{services.free_port()}"
    if embedded_kafka:
        changes["kafka_bootstrap"] = f"127.0.0.1:{services.free_port()}"
        broker = services.broker_kind()
        if broker == "tansu":
            console.say(f"hbreg: using the Tansu broker instead of Apache Kafka: {services.why_not_kafka()}")
    embedded_alertmanager = settings.alertmanager_url is None and services.alertmanager_binary() is not None
    if embedded_alertmanager:
        changes["alertmanager_url"] = f"http://127.0.0.1:{services.free_port()}"
    alerts_on = embedded_alertmanager or settings.alertmanager_url is not None
    if not alerts_on:
        console.say(
            "hbreg: alerts are off: Alertmanager is not installed (`make install` installs Debian's "
            "prometheus-alertmanager) and HBREG_ALERTMANAGER_URL is not set"
        )
    if settings.auth and settings.auth_secret is None and settings.auth_secret_file is None:
        changes["auth_secret_file"] = state.ensure_secret(settings.state_dir)
    settings = dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
    redis_url, kafka_bootstrap = settings.redis_url, settings.kafka_bootstrap
    assert redis_url is not None and kafka_bootstrap is not None
    env = {**os.environ, **settings.child_env(), "HBREG_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
    sup = Supervisor(env, console)
    sup.width = max([8, *(len(n) + 2 for n, c in counts.items() if c > 1)])
    served: dict[str, str] = {}  # child -> where it answers (its metrics, or the shared port)
    started = time.monotonic()
    code = 0
    stopper = asyncio.create_task(stop.wait())

    async def start_all() -> None:
        if embedded_redis:
            child = await sup.start("valkey", _argv(procs["valkey"]))
            await sup.wait_ready(child, redis_url.rpartition("/")[2], "valkey")
        if embedded_kafka:
            child = await sup.start("kafka", _argv(procs["kafka"]))
            await sup.wait_ready(child, kafka_bootstrap, broker)
        if embedded_alertmanager:
            child = await sup.start("alertmanager", _argv(procs["alertmanager"]))
            await sup.wait_ready(child, (settings.alertmanager_url or "").removeprefix("http://"), "alertmanager")
        skip = {"valkey", "kafka", "alertmanager"}
        skip |= (set() if settings.assigner else {"assigner"}) | (set() if alerts_on else {"alerter"})
        waits = []
        for name, command in procs.items():
            if name in skip:
                continue
            count = counts.get(name, 1)
            for index in range(count):
                argv, env, addr = _replica(name, index, _argv(command), settings)
                label = f"{name}.{index + 1}" if count > 1 else name
                child = await sup.start(label, argv, env)
                served[label] = addr
                if name in REPLICABLE:  # the others (embedded services) were waited for above
                    waits.append(sup.wait_ready(child, addr, label))
        await asyncio.gather(*waits)

    try:
        starting = asyncio.create_task(start_all())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped during start-up
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 130
        starting.result()  # raises what start-up raised
        recorded = {
            "pid": os.getpid(),
            "started_at_ms": now_ms(),
            "broker": broker,
            "redis_url": settings.redis_url,
            "kafka_bootstrap": settings.kafka_bootstrap,
            "grpc_addr": settings.grpc_addr,
            "http_addr": settings.http_addr,
            "alertmanager_url": settings.alertmanager_url,
            "auth_secret_file": str(settings.auth_secret_file) if settings.auth_secret_file else None,
            "redis_cluster": settings.redis_cluster,
            "processes": {c.name: c.proc.pid for c in sup.children},
            "replicas": {name: counts.get(name, 1) for name in REPLICABLE},
            "addresses": served,
        }
        state.write(settings.state_dir, recorded)

        def record() -> None:  # a restarted replica has a new pid
            recorded["processes"] = {c.name: c.proc.pid for c in sup.children}
            state.write(settings.state_dir, recorded)

        assigner_line = (
            f"reference assigner, metrics http://{settings.assigner_metrics_addr}/metrics"
            if settings.assigner
            else "off (HBREG_ASSIGNER=off): assign with your own Role Assignment service"
        )

        def metrics_of(name: str) -> str:
            return " ".join(f"http://{a}/metrics" for c, a in served.items() if c.partition(".")[0] == name)

        def times(name: str) -> str:
            return f" ({counts[name]} replicas)" if counts.get(name, 1) > 1 else ""

        lines = [
            f"hbreg: up in {time.monotonic() - started:.1f} s",
            f"  redis     {settings.redis_url}{' (embedded valkey)' if embedded_redis else ''}",
            f"  kafka     {settings.kafka_bootstrap}{f' (embedded {broker})' if embedded_kafka else ''}",
            f"  ingest    grpc {settings.grpc_addr}{times('ingest')}   metrics {metrics_of('ingest')}",
            f"  bridge    metrics {metrics_of('bridge')}{times('bridge')}",
            f"  worker    metrics {metrics_of('worker')}{times('worker')}",
            f"  dashboard http://{settings.http_addr}/   (query API: http://{settings.http_addr}/api/agents)"
            + times("query"),
            f"  reassign  metrics {metrics_of('reassign')}{times('reassign')}",
            f"  assigner  {assigner_line}",
            f"  alerts    {settings.alertmanager_url or 'off'}"
            + (" (embedded alertmanager)" if embedded_alertmanager else "")
            + "   hbreg alerts"
            + times("alerter"),
            f"  state     {state.path(settings.state_dir)}",
            "  events    hbreg events --follow --json",
        ]
        console.say("\n".join(lines))
        if demo:
            await sup.start(
                "demo",
                _argv(
                    [
                        "hbreg",
                        "simulate",
                        "--agents",
                        str(demo),
                        "--interval",
                        "1",
                        "--stall-fraction",
                        str(demo_stall_fraction),
                    ]
                ),
            )
        code = await _watch(sup, stop, stopper, counts, record)
    except ServiceError as exc:
        console.say(f"hbreg: {exc}")
        code = 1
    finally:
        stopper.cancel()
        # nothing below may depend on stdout (see Console)
        console.say("hbreg: stopping")
        await sup.stop_all()
        state.remove(settings.state_dir)
        console.say("hbreg: stopped")
    return code
