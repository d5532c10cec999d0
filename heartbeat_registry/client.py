"""The agent-side client: beats in the background so the program only says what it is doing.

    async with AsyncHeartbeatClient("agent-7", ["ingest-a:50051", "ingest-b:50051"], token=TOKEN) as client:
        async with client.task("job-42"):        # RUNNING job-42; COMPLETED (or FAILED) on exit
            await work()                          # cancelled if job-42 is reassigned (TaskAbandoned)

Both flavours (`AsyncHeartbeatClient` for asyncio, `HeartbeatClient` with a background thread for
synchronous programs) hold one long-lived BeatStream (falling back to unary Beat where the server does
not offer streams), beat every `interval` seconds with jitter and at once when the status changes,
sample the process's CPU themselves, reconnect with exponential backoff and jitter, and fail over between
endpoints. A heartbeat is a snapshot of the current state, so nothing queues up while disconnected: memory
stays constant and the first beat after a reconnect says where the agent is now. Only the last beat, when
it got no reply (an error, or nothing within `rpc_timeout`), is sent again whole (same seq) to the next
endpoint while it is younger than an interval: the agent's beat is still on time, and the workers count a
beat both ingests stored once. The caller is never blocked: `report()` only records.

An ASSIGN directive (the Role Assignment service handed this agent a task) reaches the program once per
(task, epoch): through `on_assign`, and `AsyncHeartbeatClient.assignments()`, an async iterator. Taking it
is working on it: `client.task(assignment.task_id)` beats RUNNING on it, which makes the agent its owner.

An ABANDON directive (the task was reassigned to someone else) calls `on_abandon` and cancels the
task's context: the asyncio task inside `client.task()` is cancelled and `TaskAbandoned` raised there, or,
in the threaded client, the context's `cancelled` event is set.

Refusals that retrying cannot fix (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT) are not retried:
the client logs them as an error, stops beating, calls `on_error`, cancels the open task contexts the same
way (raising `HeartbeatRejected` there) and raises `HeartbeatRejected` from the next `report()`, so a
program with the wrong token learns it at once instead of looping silently.

With a host relay (`relay="unix:///run/hbreg/relay.sock"`, or HBREG_RELAY in the environment), the client
beats through it instead of the ingest: a local, insecure channel and no token (the relay's socket
permissions are the boundary; it sends its own relay token upstream). Everything else stays the same:
the relay answers each beat with its own reply once the ingest acknowledged it, and passes refusals on.
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

from heartbeat_registry.beats import heartbeat
from heartbeat_registry.errors import HeartbeatRejected, TaskAbandoned
from heartbeat_registry.pb import hb, hb_grpc

log = logging.getLogger(__name__)
# read here: agents do not install core/settings.py, which documents and checks it for the tools
RELAY_ENV = "HBREG_RELAY"
Status = int  # hb.IDLE, hb.RUNNING, hb.COMPLETED, hb.FAILED, hb.STOPPING
# what retrying the same heartbeat with the same credentials can never fix
FINAL_CODES = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}
)


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """TLS to the ingest; with a client certificate and key it is mutual TLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @classmethod
    def from_files(cls, ca: str | None = None, cert: str | None = None, key: str | None = None) -> TlsConfig:
        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

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
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            return max(float(quota) / float(period), 0.01)
    except (OSError, ValueError):
        pass
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:
        return float(os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class Assignment:
    """A task handed to this agent: work on it with `client.task(task_id)` to become its owner."""

    task_id: str
    epoch: int  # its fencing epoch
    reason: str = ""


@dataclasses.dataclass
class TaskContext:
    """What `client.task()` hands the program: `cancelled` is set once the task is abandoned (then
    `directive` says why) or the client's heartbeats were rejected (then `error` says why)."""

    task_id: str
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    directive: hb.Directive | None = None
    error: HeartbeatRejected | None = None
    _owner: asyncio.Task | None = None

    def _cancel(self) -> None:
        self.cancelled.set()
        if self._owner is not None and not self._owner.done():
            self._owner.cancel()

    def _outcome(self) -> BaseException | None:
        """What leaving the block raises, when the server ended the task."""
        if self.directive is not None:
            return TaskAbandoned(self.directive)
        return self.error


class AsyncHeartbeatClient:
    def __init__(
        self,
        agent_id: str,
        endpoints: str | Sequence[str] = (),
        *,
        token: str | None = None,
        interval: float = 1.0,
        jitter: float = 0.1,
        tls: TlsConfig | None = None,
        sample_cpu: bool = True,
        on_abandon: Callable[[hb.Directive], None] | None = None,
        on_error: Callable[[HeartbeatRejected], None] | None = None,
        on_assign: Callable[[Assignment], None] | None = None,
        on_sent: Callable[[hb.Heartbeat], None] | None = None,
        on_reply: Callable[[hb.BeatReply], None] | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        rpc_timeout: float = 5.0,
        relay: str | None = None,
    ) -> None:
        if not agent_id:
            raise ValueError("agent_id must not be empty")
        if interval <= 0 or not 0 <= jitter < 1:
            raise ValueError("interval must be > 0 and jitter in [0, 1)")
        self.agent_id = agent_id
        # the host relay (None: HBREG_RELAY, "": none); it takes no token and no TLS, and sends its own
        self.relay = (os.environ.get(RELAY_ENV, "") if relay is None else relay).strip() or None
        if self.relay:
            endpoints, token, tls = self.relay, None, None
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("at least one endpoint (or a relay) is needed")
        self.token = token
        self.interval = interval
        self.jitter = jitter
        self.tls = tls
        self.on_abandon = on_abandon
        self.on_error = on_error
        self.on_assign = on_assign
        # every heartbeat as it is sent and every reply as it arrives: for a caller that keeps the whole
        # history (the chaos soak checks each acknowledged heartbeat against what the system stored)
        self.on_sent = on_sent
        self.on_reply = on_reply
        self._offered: set[tuple[str, int]] = set()
        self._assignments: asyncio.Queue[Assignment] = asyncio.Queue()
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
        self.last_reply_ms = 0  # server receive time of the newest acknowledged heartbeat
        self.beats_acknowledged = 0
        self.error: HeartbeatRejected | None = None  # set when the ingest refused us for good
        self._refused_by: set[str] = set()  # endpoints that refused us for good since the last reply
        self.use_stream = True
        self._seq = 0
        self._acked_seq = 0
        self._unanswered: tuple[float, hb.Heartbeat] | None = None  # (monotonic, beat) sent, no reply yet
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
        """Record the agent's state; a status or task change is sent at once. Never blocks; raises
        HeartbeatRejected once the ingest has refused this client's heartbeats for good."""
        if self.error is not None:
            raise self.error
        self._record(task_id=task_id, status=status, progress=progress, cpu=cpu)

    def _record(
        self,
        *,
        task_id: str | None = None,
        status: Status | None = None,
        progress: float | None = None,
        cpu: float | None = None,
    ) -> None:
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
        (raising TaskAbandoned) when the server says the task was reassigned, or (raising
        HeartbeatRejected) when the ingest refused the client's heartbeats for good."""
        self.report(task_id=task_id, status=hb.RUNNING, progress=0.0)
        ctx = TaskContext(task_id, _owner=asyncio.current_task())
        self._tasks[task_id] = ctx
        try:
            yield ctx
        except asyncio.CancelledError:
            outcome = ctx._outcome()
            if outcome is None:
                raise
            if ctx._owner is not None:
                ctx._owner.uncancel()
            raise outcome from None
        except BaseException:
            self._finish(ctx, hb.FAILED)
            raise
        finally:
            self._tasks.pop(task_id, None)
        outcome = ctx._outcome()
        self._finish(ctx, hb.COMPLETED if outcome is None else hb.FAILED)
        if outcome is not None:
            raise outcome

    def _finish(self, ctx: TaskContext, status: Status) -> None:
        if self.task_id == ctx.task_id:
            self._record(status=status, progress=1.0 if status == hb.COMPLETED else None)

    async def start(self) -> None:
        if self.error is not None:
            raise self.error
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._closing = False
        self._runner = asyncio.create_task(self._run(), name=f"heartbeat-{self.agent_id}")

    async def stop(self, leave: bool = True) -> None:
        """Stop beating; with `leave`, first say STOPPING so the silence is not taken for a stall."""
        if self._runner is None:
            return
        if leave and self.error is None:
            self._record(status=hb.STOPPING)
            deadline = time.monotonic() + self.rpc_timeout
            sent_at = self._seq
            while self.connected and self._acked_seq <= sent_at and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self._closing = True
        runner = self._runner
        # Cancel until it is done: on Python 3.11 `asyncio.wait_for` can swallow a cancellation that
        # arrives as the awaited reply completes (bpo-42130), and the loop would then beat on. (Its loops
        # also end on `_closing`, should this wait itself be cancelled.)
        while not runner.done():
            runner.cancel()
            await asyncio.wait({runner}, timeout=1.0)
        self._runner = None
        if not runner.cancelled() and runner.exception() is not None:
            log.error("heartbeat loop of %s ended with %r", self.agent_id, runner.exception())

    async def __aenter__(self) -> AsyncHeartbeatClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the beating loop ---------------------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)  # from any thread, the loop's own included

    def _next_beat(self) -> hb.Heartbeat:
        """The beat to send: the last one again, whole, if it got no reply and is younger than an interval
        (the ingest that took it may have failed before storing it, and it is already due; should both
        ingests store it, the workers count it once), else a new one."""
        if self._unanswered is not None:
            built, beat = self._unanswered
            if time.monotonic() - built < self.interval:
                return beat
        beat = self._beat()
        self._unanswered = (time.monotonic(), beat)
        return beat

    def _beat(self) -> hb.Heartbeat:
        self._seq += 1
        cpu = self.cpu if self.cpu is not None else (self._sampler.sample() if self._sampler else 0.0)
        progress = None if self.progress is None else max(0.0, min(1.0, self.progress))
        beat = heartbeat(
            self.agent_id, self.task_id, self.status, max(0.0, min(1.0, cpu)), progress=progress, seq=self._seq
        )
        if self.on_sent is not None:
            self.on_sent(beat)
        return beat

    async def _pause(self) -> None:
        """Until the next beat is due, or the program reported a change."""
        assert self._wake is not None
        delay = self.interval * self._rng.uniform(1 - self.jitter, 1 + self.jitter)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):  # not wait_for, which can swallow a cancellation (see stop())
                await self._wake.wait()
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
        self._refused_by.clear()
        self._acked_seq = max(self._acked_seq, reply.seq)
        if self._unanswered is not None and reply.seq >= self._unanswered[1].seq:
            self._unanswered = None
        self.last_reply_ms = reply.received_ms
        self.beats_acknowledged += 1
        if self.on_reply is not None:
            self.on_reply(reply)
        for directive in reply.directives:
            if directive.kind == hb.Directive.ABANDON:
                self._abandon(directive)
            elif directive.kind == hb.Directive.ASSIGN:
                self._offer(Assignment(directive.task_id, directive.epoch, directive.reason))

    def _offer(self, assignment: Assignment) -> None:
        """A new (task, epoch) offered: to the program once (the ingest repeats it until taken up)."""
        key = (assignment.task_id, assignment.epoch)
        if key in self._offered:
            return
        if len(self._offered) > 10_000:
            self._offered.clear()
        self._offered.add(key)
        self._assignments.put_nowait(assignment)
        if self.on_assign is not None:
            try:
                self.on_assign(assignment)
            except Exception:
                log.exception("on_assign callback failed")

    async def assignments(self) -> AsyncIterator[Assignment]:
        """The tasks handed to this agent, as they come (each (task, epoch) once)."""
        while True:
            yield await self._assignments.get()

    def next_assignment(self) -> Assignment | None:
        """The oldest assignment not taken from `assignments()` yet, or None (never waits)."""
        try:
            return self._assignments.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def _abandon(self, directive: hb.Directive) -> None:
        ctx = self._tasks.get(directive.task_id)
        if ctx is not None and ctx.directive is None:
            ctx.directive = directive
            ctx._cancel()
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
        misses = 0  # connections in a row that failed without a reply
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
                if self._closing:
                    return
                problem = "the ingest ended the stream"  # a draining ingest: reconnect, to another if there is one
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and self.use_stream:
                    self.use_stream = False  # an ingest (or proxy) without streams: unary Beat instead
                    continue
                if _final(exc):
                    self._refused_by.add(self.endpoint)
                    if len(self._refused_by) >= len(set(self.endpoints)):  # every endpoint says so
                        self._reject(HeartbeatRejected(exc.code().name, exc.details() or "", self.endpoint))
                        return
                    self._answered = False  # try the next endpoint: this one may be misconfigured
                pushback = _pushback_s(exc)
                problem = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # whatever happens, the agent keeps beating
                problem = repr(exc)
            self.connected = False
            if self._answered:
                backoff = self.backoff_initial  # it worked for a while: this is a fresh failure
                misses = 0
            misses += 1
            if len(self.endpoints) > 1:
                # The ingests are replicas: the next one may well serve (this one's Redis link may be cut,
                # it may be restarting). Straight on to it, after a short jittered pause; the refusal's
                # pushback and the backoff apply once every endpoint failed in a row.
                index += 1
            if len(self.endpoints) > 1 and misses < len(self.endpoints):
                # the unanswered beat goes out again there, still within its interval
                delay = self._rng.uniform(0.0, self.backoff_initial / 2)
            else:
                delay = retry_delay(pushback, backoff, self._rng)
            # the code and details go into the message itself: a default formatter drops `extra`; `extra`
            # names the agent, for a program that runs several (the soak records them per agent)
            log.warning(
                "heartbeat call to %s failed: %s; retrying in %.1f s",
                self.endpoint,
                problem,
                delay,
                extra={"agent_id": self.agent_id, "endpoint": self.endpoint, "problem": problem, "retry_in_s": delay},
            )
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, self.backoff_max)

    def _reject(self, error: HeartbeatRejected) -> None:
        """The ingest refused us for good: say so plainly, stop, and tell the program."""
        self.connected = False
        self.error = error
        log.error("heartbeats of agent %s refused: %s", self.agent_id, error)
        for ctx in list(self._tasks.values()):
            if ctx.error is None and ctx.directive is None:
                ctx.error = error
                ctx._cancel()
        if self.on_error is not None:
            try:
                self.on_error(error)
            except Exception:
                log.exception("on_error callback failed")

    async def _stream(self, stub: hb_grpc.HeartbeatServiceStub) -> None:
        call = stub.BeatStream(metadata=self._metadata())
        try:
            while not self._closing:
                await call.write(self._next_beat())
                reply = await asyncio.wait_for(call.read(), self.rpc_timeout)
                if reply is grpc.aio.EOF:
                    return  # ended with OK (a draining ingest); a refusal raises from read() instead
                self._on_reply(reply)
                await self._pause()
        finally:
            call.cancel()

    async def _unary(self, stub: hb_grpc.HeartbeatServiceStub) -> None:
        while not self._closing:
            reply = await stub.Beat(self._next_beat(), timeout=self.rpc_timeout, metadata=self._metadata())
            self._on_reply(reply)
            await self._pause()


def _final(exc: grpc.aio.AioRpcError) -> bool:
    """A refusal retrying cannot fix: credentials, identity, an invalid heartbeat. Not a clock the ingest
    finds too far off (`timestamp:`): an agent that booted before its clock was synchronised recovers."""
    return exc.code() in FINAL_CODES and not (exc.details() or "").startswith("timestamp:")


def retry_delay(pushback_s: float, backoff_s: float, rng: random.Random) -> float:
    """Seconds to wait before connecting again. An ingest that refuses a crowd (a reconnect storm, Redis
    down) names the wait in `grpc-retry-pushback-ms`: it is a floor, and a random extra of up to a quarter
    of it keeps thousands of agents told the same wait from coming back in the same instant. Without
    one, exponential backoff with jitter."""
    if pushback_s > 0:
        return pushback_s * rng.uniform(1.0, 1.25)
    return backoff_s * rng.uniform(0.5, 1.5)


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

    def __init__(self, agent_id: str, endpoints: str | Sequence[str] = (), **options: Any) -> None:
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

    @property
    def error(self) -> HeartbeatRejected | None:
        return self._client.error

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
        """RUNNING `task_id` for the block; `ctx.cancelled` is set if it is reassigned (`ctx.directive`)
        or the client's heartbeats were rejected for good (`ctx.error`)."""
        self._client.report(task_id=task_id, status=hb.RUNNING, progress=0.0)
        ctx = TaskContext(task_id)
        self._client._tasks[task_id] = ctx
        try:
            yield ctx
        except BaseException:
            self._client._finish(ctx, hb.FAILED)
            raise
        finally:
            self._client._tasks.pop(task_id, None)
        self._client._finish(ctx, hb.COMPLETED if ctx._outcome() is None else hb.FAILED)
