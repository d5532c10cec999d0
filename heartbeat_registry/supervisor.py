"""`hbreg up`: runs every process of the Procfile, prints where each listens, stops them all.

Children run in their own sessions (a Ctrl-C reaches only this supervisor, which then stops them in
reverse order so the ingest drains before Redis goes) and get SIGTERM from the kernel if the
supervisor itself dies, so no process is left behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import pathlib
import secrets
import shlex
import shutil
import signal
import sys
import time

from heartbeat_registry import embedded, state
from heartbeat_registry.errors import ServiceError
from heartbeat_registry.settings import Settings

PROCFILE = embedded.PROJECT_ROOT / "Procfile"
STOP_TIMEOUT = 20.0
START_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


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


async def _pump(name: str, stream: asyncio.StreamReader, width: int) -> None:
    while line := await stream.readline():
        sys.stdout.write(f"{name:<{width}} | {line.decode(errors='replace')}")
        sys.stdout.flush()


class Supervisor:
    def __init__(self, settings: Settings, env: dict[str, str]) -> None:
        self.settings = settings
        self.env = env
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
        child = Child(name, proc, asyncio.create_task(_pump(name, proc.stdout, self.width)))
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
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
        raise ServiceError(f"{what} did not listen on {addr} within {START_TIMEOUT:.0f} s")

    async def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.proc.returncode is None:
                try:
                    os.killpg(child.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    await asyncio.wait_for(child.proc.wait(), STOP_TIMEOUT)
                except asyncio.TimeoutError:
                    print(f"{child.name} did not stop within {STOP_TIMEOUT:.0f} s: killing it", flush=True)
                    try:
                        os.killpg(child.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    await child.proc.wait()
            await child.pump


def ensure_secret(state_dir: pathlib.Path) -> pathlib.Path:
    """The token signing secret `hbreg up` keeps in its state directory (made once, mode 600), so
    `hbreg token` and the demo fleet on this machine just work."""
    path = pathlib.Path(state_dir) / "auth_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path


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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    embedded_redis = settings.redis_url is None
    embedded_kafka = settings.kafka_bootstrap is None
    broker = "external"
    changes: dict[str, str] = {}
    if embedded_redis:
        changes["redis_url"] = f"redis://127.0.0.1:{embedded.free_port()}"
    if embedded_kafka:
        changes["kafka_bootstrap"] = f"127.0.0.1:{embedded.free_port()}"
        broker = embedded.broker_kind()
        if broker == "tansu":
            print(f"hbreg: using the Tansu broker instead of Apache Kafka: {embedded.why_not_kafka()}", flush=True)
    if settings.auth and settings.auth_secret is None and settings.auth_secret_file is None:
        changes["auth_secret_file"] = ensure_secret(settings.state_dir)
    settings = dataclasses.replace(settings, **changes)
    env = {**os.environ, **settings.child_env(), "HBREG_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
    sup = Supervisor(settings, env)
    started = time.monotonic()
    code = 0
    try:
        if embedded_redis:
            child = await sup.start("valkey", _argv(procs["valkey"]))
            await sup.wait_ready(child, settings.redis_url.rpartition("/")[2], "valkey")
        if embedded_kafka:
            child = await sup.start("kafka", _argv(procs["kafka"]))
            await sup.wait_ready(child, settings.kafka_bootstrap, broker)
        ready = {
            "ingest": settings.grpc_addr,
            "bridge": settings.bridge_metrics_addr,
            "worker": settings.worker_web_addr,
            "query": settings.http_addr,
        }
        waits = []
        for name, addr in ready.items():
            child = await sup.start(name, _argv(procs[name]))
            waits.append(sup.wait_ready(child, addr, name))
        await asyncio.gather(*waits)
        state.write(
            settings.state_dir,
            {
                "pid": os.getpid(),
                "started_at_ms": int(time.time() * 1000),
                "broker": broker,
                "redis_url": settings.redis_url,
                "kafka_bootstrap": settings.kafka_bootstrap,
                "grpc_addr": settings.grpc_addr,
                "http_addr": settings.http_addr,
                "auth_secret_file": str(settings.auth_secret_file) if settings.auth_secret_file else None,
                "processes": {c.name: c.proc.pid for c in sup.children},
            },
        )
        lines = [
            f"hbreg: up in {time.monotonic() - started:.1f} s",
            f"  redis     {settings.redis_url}{' (embedded valkey)' if embedded_redis else ''}",
            f"  kafka     {settings.kafka_bootstrap}{f' (embedded {broker})' if embedded_kafka else ''}",
            f"  ingest    grpc {settings.grpc_addr}   metrics http://{settings.ingest_metrics_addr}/metrics",
            f"  bridge    metrics http://{settings.bridge_metrics_addr}/metrics",
            f"  worker    metrics http://{settings.worker_web_addr}/metrics",
            f"  query     http://{settings.http_addr}/api/agents",
            f"  state     {state.path(settings.state_dir)}",
            "  events    hbreg events --follow --json",
        ]
        print("\n".join(lines), flush=True)
        if demo:
            await sup.start(
                "demo",
                _argv(["hbreg", "simulate", "--agents", str(demo), "--interval", "1",
                       "--stall-fraction", str(demo_stall_fraction)]),
            )
        waiters = {asyncio.create_task(c.proc.wait()): c for c in sup.children}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task in waiters and not stop.is_set():
                crashed = waiters[task]
                print(f"hbreg: {crashed.name} exited with code {crashed.proc.returncode}; stopping", flush=True)
                code = 1
        stopper.cancel()
        for task in waiters:
            task.cancel()
    except ServiceError as exc:
        print(f"hbreg: {exc}", flush=True)
        code = 1
    finally:
        print("hbreg: stopping", flush=True)
        await sup.stop_all()
        state.remove(settings.state_dir)
        print("hbreg: stopped", flush=True)
    return code
