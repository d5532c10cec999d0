"""The agent-side client: beats in the background so the program only says what it is doing.

    async with AsyncHeartbeatClient("agent-7", ["ingest-a:50051", "ingest-b:50051"], token=TOKEN) as client:
        async with client.task("job-42"):        # RUNNING job-42; COMPLETED (or FAILED) on exit
            await work()                          # cancelled if job-42 is reassigned (TaskAbandoned)

Both flavours (`AsyncHeartbeatClient` for asyncio, `HeartbeatClient` with a background thread for
synchronous programs) hold one long-lived BeatStream (falling back to unary Beat where the server does
not offer streams), beat every `interval` seconds with jitter and at once when the status changes,
sample the process's CPU themselves, reconnect with exponential backoff and jitter, and fail over between
endpoints. A heartbeat is a snapshot of the current state, so nothing queues up while disconnected: memory
stays constant and the first beat after a reconnect says where the agent is now. The caller is never
blocked: `report()` only records.

An ABANDON directive (the task was reassigned to someone else) calls `on_abandon` and cancels the
task's context: the asyncio task inside `client.task()` is cancelled and `TaskAbandoned` raised there, or,
in the threaded client, the context's `cancelled` event is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc

from heartbeat_registry.pb import hb, hb_grpc

log = logging.getLogger(__name__)
Status = int  # hb.IDLE, hb.RUNNING, hb.COMPLETED, hb.FAILED, hb.STOPPING


class TaskAbandoned(Exception):
    """The task was reassigned to another agent (fencing); stop working on it."""

    def __init__(self, directive: hb.Directive) -> None:
        super().__init__(f"task {directive.task_id} was reassigned (epoch {directive.epoch}): {directive.reason}")
        self.directive = directive


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """TLS to the ingest; with a client certificate and key it is mutual TLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @classmethod
    def from_files(cls, ca: str | None = None, cert: str | None = None, key: str | None = None) -> TlsConfig:
        def read(path: str | None) -> bytes | None:
            return open(path, "rb").read() if path else None

        return cls(read(ca), read(cert), read(key))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


class CpuSampler:
    """This process's CPU use as a fraction of its allotment (cgroup quota, else usable cores)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self.allotment = _cpu_allotment()

    def sample(self) -> float:
        return max(0.0, min(1.0, self._process.cpu_percent(None) / 100.0 / self.allotment))


def _cpu_allotment() -> float:
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            return max(float(quota) / float(period), 0.01)
    except (OSError, ValueError):
        pass
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:
        return float(os.cpu_count() or 1)


@dataclasses.dataclass
class TaskContext:
    """What `client.task()` hands the program: `cancelled` is set once the task is abandoned."""

    task_id: str
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    directive: hb.Directive | None = None
    _owner: asyncio.Task | None = None


class AsyncHeartbeatClient:
    def __init__(
        self,
        agent_id: str,
        endpoints: str | Sequence[str],
        *,
        token: str | None = None,
        interval: float = 1.0,
        jitter: float = 0.1,
        tls: TlsConfig | None = None,
        sample_cpu: bool = True,
        on_abandon: Callable[[hb.Directive], None] | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        rpc_timeout: float = 5.0,
    ) -> None:
        if not agent_id:
            raise ValueError("agent_id must not be empty")
        if interval <= 0 or not 0 <= jitter < 1:
            raise ValueError("interval must be > 0 and jitter in [0, 1)")
        self.agent_id = agent_id
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("at least one endpoint is needed")
        self.token = token
        self.interval = interval
        self.jitter = jitter
        self.tls = tls
        self.on_abandon = on_abandon
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.rpc_timeout = rpc_timeout
        self._sampler = CpuSampler() if sample_cpu else None
        self.task_id = ""
        self.status: Status = hb.IDLE
        self.progress: float | None = None
        self.cpu: float | None = None  # reported by the program; overrides the sampler
        self.connected = False
        self.endpoint = self.endpoints[0]
        self.last_reply_ms = 0
        self.use_stream = True
        self._seq = 0
        self._acked_seq = 0
        self._answered = False  # the current connection got at least one reply
        self._tasks: dict[str, TaskContext] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task | None = None
        self._closing = False
        self._rng = random.Random()

    # --- what the program calls ---------------------------------------------------------------

    def report(
        self,
        *,
        task_id: str | None = None,
        status: Status | None = None,
        progress: float | None = None,
        cpu: float | None = None,
    ) -> None:
        """Record the agent's state; a status or task change is sent at once. Never blocks."""
        changed = (task_id is not None and task_id != self.task_id) or (status is not None and status != self.status)
        if task_id is not None:
            self.task_id = task_id
        if status is not None:
            self.status = status
        if progress is not None:
            self.progress = progress
        if cpu is not None:
            self.cpu = cpu
        if changed:
            self._poke()

    @contextlib.asynccontextmanager
    async def task(self, task_id: str) -> AsyncIterator[TaskContext]:
        """RUNNING `task_id` for the block: COMPLETED on exit, FAILED on an exception, and cancelled
        (raising TaskAbandoned) when the server says the task was reassigned."""
        ctx = TaskContext(task_id, _owner=asyncio.current_task())
        self._tasks[task_id] = ctx
        self.report(task_id=task_id, status=hb.RUNNING, progress=0.0)
        try:
            yield ctx
        except asyncio.CancelledError:
            if ctx.directive is None:
                raise
            if ctx._owner is not None:
                ctx._owner.uncancel()
            raise TaskAbandoned(ctx.directive) from None
        except BaseException:
            self._finish(ctx, hb.FAILED)
            raise
        finally:
            self._tasks.pop(task_id, None)
        self._finish(ctx, hb.FAILED if ctx.directive else hb.COMPLETED)
        if ctx.directive is not None:
            raise TaskAbandoned(ctx.directive)

    def _finish(self, ctx: TaskContext, status: Status) -> None:
        if self.task_id == ctx.task_id:
            self.report(status=status, progress=1.0 if status == hb.COMPLETED else None)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._closing = False
        self._runner = asyncio.create_task(self._run(), name=f"heartbeat-{self.agent_id}")

    async def stop(self, leave: bool = True) -> None:
        """Stop beating; with `leave`, first say STOPPING so the silence is not taken for a stall."""
        if self._runner is None:
            return
        if leave:
            self.report(status=hb.STOPPING)
            deadline = time.monotonic() + self.rpc_timeout
            sent_at = self._seq
            while self.connected and self._acked_seq <= sent_at and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self._closing = True
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner
        self._runner = None

    async def __aenter__(self) -> AsyncHeartbeatClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the beating loop ---------------------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)  # from any thread, the loop's own included

    def _beat(self) -> hb.Heartbeat:
        self._seq += 1
        cpu = self.cpu if self.cpu is not None else (self._sampler.sample() if self._sampler else 0.0)
        beat = hb.Heartbeat(
            agent_id=self.agent_id,
            task_id=self.task_id,
            status=self.status,
            timestamp=time.time_ns() // 1_000_000,
            cpu_util=max(0.0, min(1.0, cpu)),
            seq=self._seq,
        )
        if self.progress is not None:
            beat.progress = max(0.0, min(1.0, self.progress))
        return beat

    async def _pause(self) -> None:
        """Until the next beat is due, or the program reported a change."""
        assert self._wake is not None
        delay = self.interval * self._rng.uniform(1 - self.jitter, 1 + self.jitter)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        options = [("grpc.keepalive_time_ms", 20_000), ("grpc.enable_retries", 0)]
        if self.tls is not None:
            return grpc.aio.secure_channel(endpoint, self.tls.credentials(), options=options)
        return grpc.aio.insecure_channel(endpoint, options=options)

    def _on_reply(self, reply: hb.BeatReply) -> None:
        self.connected = True
        self._answered = True
        self._acked_seq = max(self._acked_seq, reply.seq)
        self.last_reply_ms = reply.received_ms
        for directive in reply.directives:
            if directive.kind == hb.Directive.ABANDON:
                self._abandon(directive)

    def _abandon(self, directive: hb.Directive) -> None:
        ctx = self._tasks.get(directive.task_id)
        if ctx is not None and ctx.directive is None:
            ctx.directive = directive
            ctx.cancelled.set()
            if ctx._owner is not None and not ctx._owner.done():
                ctx._owner.cancel()
        if self.task_id == directive.task_id:
            self.task_id, self.status, self.progress = "", hb.IDLE, None
        if self.on_abandon is not None:
            try:
                self.on_abandon(directive)
            except Exception:
                log.exception("on_abandon callback failed")

    async def _run(self) -> None:
        backoff = self.backoff_initial
        index = 0
        while not self._closing:
            self.endpoint = self.endpoints[index % len(self.endpoints)]
            pushback = 0.0
            self._answered = False
            try:
                async with self._channel(self.endpoint) as channel:
                    stub = hb_grpc.HeartbeatServiceStub(channel)
                    if self.use_stream:
                        await self._stream(stub)
                    else:
                        await self._unary(stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and self.use_stream:
                    self.use_stream = False  # an ingest (or proxy) without streams: unary Beat instead
                    continue
                pushback = _pushback_s(exc)
                log.warning("heartbeat call failed", extra={"endpoint": self.endpoint, "code": exc.code().name,
                                                             "details": exc.details()})
            except Exception as exc:  # whatever happens, the agent keeps beating
                log.warning("heartbeat call failed", extra={"endpoint": self.endpoint, "error": repr(exc)})
            self.connected = False
            if self._answered:
                backoff = self.backoff_initial  # it worked for a while: retry it first
            else:
                index += 1  # this endpoint did not answer: try the next one
            await asyncio.sleep(max(pushback, backoff * self._rng.uniform(0.5, 1.5)))
            backoff = min(backoff * 2, self.backoff_max)

    async def _stream(self, stub: hb_grpc.HeartbeatServiceStub) -> None:
        call = stub.BeatStream(metadata=self._metadata())
        try:
            while True:
                await call.write(self._beat())
                reply = await asyncio.wait_for(call.read(), self.rpc_timeout)
                if reply is grpc.aio.EOF:
                    await call  # raises the call's status
                    return
                self._on_reply(reply)
                await self._pause()
        finally:
            call.cancel()

    async def _unary(self, stub: hb_grpc.HeartbeatServiceStub) -> None:
        while True:
            reply = await stub.Beat(self._beat(), timeout=self.rpc_timeout, metadata=self._metadata())
            self._on_reply(reply)
            await self._pause()


def _pushback_s(exc: grpc.aio.AioRpcError) -> float:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            try:
                return int(value) / 1000
            except ValueError:
                return 0.0
    return 0.0


class HeartbeatClient:
    """The same client for synchronous programs: it beats from a background thread.

        with HeartbeatClient("agent-7", "ingest:50051", token=TOKEN) as client:
            with client.task("job-42") as ctx:
                while not ctx.cancelled.is_set():
                    step()
    """

    def __init__(self, agent_id: str, endpoints: str | Sequence[str], **options: Any) -> None:
        self._client = AsyncHeartbeatClient(agent_id, endpoints, **options)
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def endpoint(self) -> str:
        return self._client.endpoint

    @property
    def last_reply_ms(self) -> int:
        return self._client.last_reply_ms

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever, name="heartbeat-client", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._client.start(), self._loop).result()

    def stop(self, leave: bool = True) -> None:
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._client.stop(leave), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> HeartbeatClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def report(self, **state: Any) -> None:
        """See AsyncHeartbeatClient.report; safe from any thread, never blocks."""
        self._client.report(**state)

    @contextlib.contextmanager
    def task(self, task_id: str) -> Iterator[TaskContext]:
        """RUNNING `task_id` for the block; `ctx.cancelled` is set if it is reassigned."""
        ctx = TaskContext(task_id)
        self._client._tasks[task_id] = ctx
        self._client.report(task_id=task_id, status=hb.RUNNING, progress=0.0)
        try:
            yield ctx
        except BaseException:
            self._client._finish(ctx, hb.FAILED)
            raise
        finally:
            self._client._tasks.pop(task_id, None)
        self._client._finish(ctx, hb.FAILED if ctx.directive else hb.COMPLETED)
