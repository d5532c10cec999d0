"""Every process of the system for a soak, started and supervised the way a deployment runs them.

- Valkey with the production configuration (infra/valkey/valkey.conf: an fsynced append-only file), one
  Kafka broker, Alertmanager, and Toxiproxy.
- Two replicas of every process the design allows (ingest, bridge, worker, query, reassign, alerter) and
  the reference assigner. Each ingest replica listens on its own port (the fleet knows both, as it would
  know a Service's endpoints) and reaches Redis through a proxy of its own; each bridge reaches Kafka
  through its own proxy (a listener of the broker that advertises the proxy's address).
- A process that exits is started again a second later, as a supervisor would; an exit the soak did not
  cause is recorded as a crash (a finding of the soak).
- CPU is shared as a deployment shares it: there every process gets CPU in proportion to its request
  (infra/k8s), and Kafka runs on nodes of its own. On one machine the same shares come from niceness
  (`NICE`), so a stage that can catch up (a restarting broker, a sink starting Python) does not take
  the CPU of the path every agent waits on (the fleet, the ingest, Toxiproxy and Valkey).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import signal
import sys
import time

import aiohttp

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.errors import ServiceError
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.chaos.toxiproxy import Toxiproxy
from heartbeat_registry.hbreg.up import GROUP_MEMBERS

log = logging.getLogger(__name__)
REPLICAS = {"ingest": 2, "bridge": 2, "worker": 2, "query": 2, "reassign": 2, "alerter": 2, "assigner": 1}
# the settings holding each process's own health address (query replicas share the HTTP port)
HEALTH = {
    "ingest": "ingest_metrics_addr",
    "bridge": "bridge_metrics_addr",
    "worker": "worker_web_addr",
    "query": "http_addr",
    "reassign": "reassign_metrics_addr",
    "alerter": "alerts_metrics_addr",
    "assigner": "assigner_metrics_addr",
}
# niceness by process: the Linux scheduler's weight falls ~1.25x per step, so 3 steps halve a share and
# 10 give a tenth; 0 for a 1-CPU request (ingest, worker) and for the embedded services on the
# acknowledgement path (Valkey, Toxiproxy), 3 for 500m (bridge), 6 for 250m (query), 10 for 100m or less
# (the sinks, the assigner, Alertmanager) and for Kafka, which a deployment runs on nodes of its own
NICE = {"bridge": 3, "query": 6, "reassign": 10, "alerter": 10, "assigner": 10, "alertmanager": 10, "kafka": 10}
START_TIMEOUT_S = 90.0
RESTART_DELAY_S = 1.0


@dataclasses.dataclass
class Proc:
    name: str  # `ingest.1`, `valkey`, ...
    argv: list[str]
    env: dict[str, str]
    health: str | None  # host:port of its /healthz, None for the embedded services
    listen: str | None = None  # host:port it accepts connections on once started
    proc: asyncio.subprocess.Process | None = None
    held: bool = False  # a fault is acting on it: not restarted by the supervisor meanwhile

    @property
    def kind(self) -> str:
        return self.name.partition(".")[0]


class System:
    def __init__(self, settings: Settings, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}
        self.crashes: list[dict[str, object]] = []
        self.valkey_port = services.free_port()
        self.kafka_port = services.free_port()
        self.toxiproxy_api = f"127.0.0.1:{services.free_port()}"
        self.toxiproxy = Toxiproxy(self.toxiproxy_api)
        self.ingest_addrs = [f"127.0.0.1:{services.free_port()}" for _ in range(REPLICAS["ingest"])]
        self.settings = dataclasses.replace(
            settings,
            redis_url=f"redis://127.0.0.1:{self.valkey_port}",
            kafka_bootstrap=f"127.0.0.1:{self.kafka_port}",
            alertmanager_url=f"http://127.0.0.1:{services.free_port()}",
            grpc_addr=self.ingest_addrs[0],
        )
        self._supervisor: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    # --- starting ------------------------------------------------------------------------------

    async def start(self) -> None:
        binary = services.toxiproxy_binary()
        if binary is None:
            raise ServiceError("Toxiproxy is not installed: run `make install` (it builds it with Go)")
        s = self.settings
        await self._launch(
            Proc(
                "toxiproxy",
                [binary, "-host", "127.0.0.1", "-port", self.toxiproxy_api.rpartition(":")[2]],
                {},
                None,
                self.toxiproxy_api,
            )
        )
        valkey = services.valkey_command(self.valkey_port, self.workdir / "valkey", durable=True)
        valkey += ["--latency-monitor-threshold", "100"]  # the verdict reports Valkey's slow fsyncs and forks
        await self._launch(Proc("valkey", valkey, {}, None, f"127.0.0.1:{self.valkey_port}"))
        # one listener of the broker per bridge replica, advertising that bridge's proxy
        kafka_links = [(services.free_port(), services.free_port()) for _ in range(REPLICAS["bridge"])]
        kafka = services.kafka_command(self.kafka_port, self.workdir / "kafka", proxied=kafka_links)
        await self._launch(Proc("kafka", kafka, {}, None, f"127.0.0.1:{self.kafka_port}"))
        am_port = int((s.alertmanager_url or "").rpartition(":")[2])
        alertmanager = services.alertmanager_command(am_port, self.workdir / "alertmanager", s.http_addr)
        await self._launch(Proc("alertmanager", alertmanager, {}, None, f"127.0.0.1:{am_port}"))
        redis_links = [services.free_port() for _ in range(REPLICAS["ingest"])]
        for n, port in enumerate(redis_links, 1):
            await self.toxiproxy.create(f"ingest.{n}-redis", f"127.0.0.1:{port}", f"127.0.0.1:{self.valkey_port}")
        for n, (listen, proxy) in enumerate(kafka_links, 1):
            await self.toxiproxy.create(f"bridge.{n}-kafka", f"127.0.0.1:{proxy}", f"127.0.0.1:{listen}")
        base = {**os.environ, **s.child_env(), "PYTHONUNBUFFERED": "1"}
        starting = []
        for kind, count in REPLICAS.items():
            for n in range(1, count + 1):
                name = f"{kind}.{n}" if count > 1 else kind
                env = dict(base)
                health = getattr(s, HEALTH[kind])
                if kind != "query" and n > 1:
                    health = f"127.0.0.1:{services.free_port()}"
                    env["HBREG_" + HEALTH[kind].upper()] = health
                argv = [sys.executable, "-m", "heartbeat_registry", kind]
                if kind == "ingest":
                    env["HBREG_GRPC_ADDR"] = self.ingest_addrs[n - 1]
                    env["HBREG_INGEST_PROCESSES"] = "1"
                    env["HBREG_REDIS_URL"] = f"redis://127.0.0.1:{redis_links[n - 1]}"
                if kind in GROUP_MEMBERS:
                    env["HBREG_INSTANCE"] = f"{kind}-{n}"
                if kind == "bridge":
                    argv += ["--name", f"bridge-{n}"]
                    env["HBREG_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{kafka_links[n - 1][1]}"
                starting.append(self._launch(Proc(name, argv, env, health), wait=False))
        await asyncio.gather(*starting)
        await asyncio.gather(*(self.wait_healthy(p.name) for p in self.procs.values() if p.health))
        self._supervisor = asyncio.create_task(self._supervise())

    async def _launch(self, proc: Proc, wait: bool = True) -> None:
        self.procs[proc.name] = proc
        await self._spawn(proc)
        if wait and proc.listen:
            host, _, port = proc.listen.rpartition(":")
            await asyncio.to_thread(services.wait_port, host, int(port), START_TIMEOUT_S, proc.name)

    async def _spawn(self, proc: Proc) -> None:
        # No preexec_fn (core.lifecycle.die_with_parent): this process runs gRPC threads, and Python code
        # between fork and exec in a threaded process can crash the child (it did: SIGSEGV on restarts).
        # util-linux's setpriv sets the same parent-death signal from the exec'd side instead.
        argv = ["setpriv", "--pdeathsig", "TERM", "--", *proc.argv] if shutil.which("setpriv") else proc.argv
        if proc.kind in NICE:  # coreutils' nice: every thread the process starts inherits it
            argv = ["nice", "-n", str(NICE[proc.kind]), *argv]
        with open(self.logs / f"{proc.name}.log", "ab") as out:
            proc.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=proc.env or None,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    # --- health --------------------------------------------------------------------------------

    async def healthy(self, name: str) -> bool:
        """The process answers its /healthz with 200 (a worker: and owns partitions)."""
        proc = self.procs[name]
        if proc.health is None:
            return proc.proc is not None and proc.proc.returncode is None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1))
        try:
            async with self._session.get(f"http://{proc.health}/healthz") as response:
                if response.status != 200:
                    return False
                if proc.kind == "worker":
                    return bool((await response.json()).get("partitions"))
                return True
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def wait_healthy(self, name: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not await self.healthy(name):
            proc = self.procs[name].proc
            if proc is not None and proc.returncode is not None and not self.procs[name].held:
                raise ServiceError(f"{name} exited with code {proc.returncode} (log: {self.logs / name}.log)")
            if time.monotonic() > deadline:
                raise ServiceError(f"{name} was not healthy within {timeout:.0f} s (log: {self.logs / name}.log)")
            await asyncio.sleep(0.1)

    # --- faults --------------------------------------------------------------------------------

    def _signal(self, name: str, sig: int) -> None:
        proc = self.procs[name].proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill `name` (SIGKILL, or SIGTERM for a graceful restart) and start it again at once."""
        proc = self.procs[name]
        proc.held = True
        try:
            self._signal(name, sig)
            if proc.proc is not None:
                await asyncio.wait_for(proc.proc.wait(), 60)
            await self._spawn(proc)
            if proc.listen:
                host, _, port = proc.listen.rpartition(":")
                await asyncio.to_thread(services.wait_port, host, int(port), START_TIMEOUT_S, name)
        finally:
            proc.held = False

    async def pause(self, name: str, seconds: float) -> None:
        self.procs[name].held = True
        try:
            self._signal(name, signal.SIGSTOP)
            await asyncio.sleep(seconds)
        finally:
            self._signal(name, signal.SIGCONT)
            self.procs[name].held = False

    async def _supervise(self) -> None:
        """Start again what exited on its own, and record it."""
        while True:
            await asyncio.sleep(0.2)
            for proc in self.procs.values():
                if proc.held or proc.proc is None or proc.proc.returncode is None:
                    continue
                self.crashes.append({"process": proc.name, "exit_code": proc.proc.returncode, "at": time.time()})
                log.warning("%s exited with code %s on its own: starting it again", proc.name, proc.proc.returncode)
                proc.held = True
                await asyncio.sleep(RESTART_DELAY_S)
                await self._spawn(proc)
                proc.held = False

    # --- stopping ------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Everything stops gracefully (SIGTERM, in reverse start order), the embedded services last."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        for proc in reversed(list(self.procs.values())):
            if proc.proc is None or proc.proc.returncode is not None:
                continue
            self._signal(proc.name, signal.SIGCONT)
            self._signal(proc.name, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.proc.wait(), 30)
            except TimeoutError:
                self._signal(proc.name, signal.SIGKILL)
                await proc.proc.wait()
        await self.toxiproxy.close()
        if self._session is not None:
            await self._session.close()
