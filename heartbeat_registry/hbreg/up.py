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
import ctypes
import dataclasses
import os
import pathlib
import shlex
import shutil
import signal
import sys
import time

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import lifecycle, state
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.errors import ServiceError
from heartbeat_registry.hbreg import services

PROCFILE = services.PROJECT_ROOT / "Procfile"
STOP_TIMEOUT = 20.0
START_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1
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


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclasses.dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    pump: asyncio.Task


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

    async def start(self, name: str, argv: list[str]) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        assert proc.stdout is not None
        child = Child(name, proc, asyncio.create_task(_pump(name, proc.stdout, self.width, self.console)))
        self.children.append(child)
        return child

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


async def up(settings: Settings, demo: int = 0, demo_stall_fraction: float = 0.15) -> int:
    """Start everything, wait for a signal or a crash, stop everything. Returns the exit code."""
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
        ready = {  # where a process answers once it is up (others are only started)
            "ingest": settings.grpc_addr,
            "bridge": settings.bridge_metrics_addr,
            "worker": settings.worker_web_addr,
            "query": settings.http_addr,
            "reassign": settings.reassign_metrics_addr,
            "assigner": settings.assigner_metrics_addr,
            "alerter": settings.alerts_metrics_addr,
        }
        skip = {"valkey", "kafka", "alertmanager"}
        skip |= (set() if settings.assigner else {"assigner"}) | (set() if alerts_on else {"alerter"})
        waits = []
        for name, command in procs.items():
            if name not in skip:
                child = await sup.start(name, _argv(command))
                if name in ready:
                    waits.append(sup.wait_ready(child, ready[name], name))
        await asyncio.gather(*waits)

    try:
        starting = asyncio.create_task(start_all())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped during start-up
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 130
        starting.result()  # raises what start-up raised
        state.write(
            settings.state_dir,
            {
                "pid": os.getpid(),
                "started_at_ms": now_ms(),
                "broker": broker,
                "redis_url": settings.redis_url,
                "kafka_bootstrap": settings.kafka_bootstrap,
                "grpc_addr": settings.grpc_addr,
                "http_addr": settings.http_addr,
                "alertmanager_url": settings.alertmanager_url,
                "auth_secret_file": str(settings.auth_secret_file) if settings.auth_secret_file else None,
                "processes": {c.name: c.proc.pid for c in sup.children},
            },
        )
        assigner_line = (
            f"reference assigner, metrics http://{settings.assigner_metrics_addr}/metrics"
            if settings.assigner
            else "off (HBREG_ASSIGNER=off): assign with your own Role Assignment service"
        )
        lines = [
            f"hbreg: up in {time.monotonic() - started:.1f} s",
            f"  redis     {settings.redis_url}{' (embedded valkey)' if embedded_redis else ''}",
            f"  kafka     {settings.kafka_bootstrap}{f' (embedded {broker})' if embedded_kafka else ''}",
            f"  ingest    grpc {settings.grpc_addr}   metrics http://{settings.ingest_metrics_addr}/metrics",
            f"  bridge    metrics http://{settings.bridge_metrics_addr}/metrics",
            f"  worker    metrics http://{settings.worker_web_addr}/metrics",
            f"  dashboard http://{settings.http_addr}/   (query API: http://{settings.http_addr}/api/agents)",
            f"  reassign  metrics http://{settings.reassign_metrics_addr}/metrics",
            f"  assigner  {assigner_line}",
            f"  alerts    {settings.alertmanager_url or 'off'}"
            + (" (embedded alertmanager)" if embedded_alertmanager else "")
            + "   hbreg alerts",
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
        waiters = {asyncio.create_task(c.proc.wait()): c for c in sup.children}
        done, _ = await asyncio.wait({stopper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task in waiters and not stop.is_set():
                crashed = waiters[task]
                console.say(f"hbreg: {crashed.name} exited with code {crashed.proc.returncode}; stopping")
                code = 1
        for task in waiters:
            task.cancel()
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
