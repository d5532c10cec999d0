"""The host relay: many agents' heartbeats in, one BeatBatch every few milliseconds out.

Why: the ingest spends about 80 µs of CPU on every gRPC message but a few µs per heartbeat inside a
BeatBatch (docs/benchmarks.md: grpcio's per-message cost). A relay on the agents' host (or in their pod,
as a sidecar) answers each agent's own call there and sends the ingest what arrived in the last `flush`
seconds as one batch under its relay token, so the per-message cost is paid on the agents' hosts.

`Relay` is the core, usable in-process: `await relay.submit(beat)` returns the agent's own BeatReply (its
`seq`, the batch's receive time and the directives that name the agent) once the ingest acknowledged the
batch that carried it, so an answered heartbeat is durable in Redis, end to end, as with the ingest
itself. `RelayService` serves it as HeartbeatService to the agents on a Unix socket or a loopback port
(`listen`); `hbreg relay` (heartbeat_registry/hbreg/relay.py) adds health, metrics, logs and signals.
This module needs only grpcio and the generated code: a host runs the relay with the client install.

The rules it keeps:
- Order: an agent's beats reach the ingest in the order they were submitted. Up to `max_in_flight`
  batches travel at once, but never two with the same agent: a beat stays queued while an earlier beat
  of its agent is in flight or still queued.
- A refusal of one heartbeat stays that agent's: the ingest refuses a BeatBatch whole and names the first
  refused heartbeat (`heartbeats[i].field: ...`); that beat fails with the same status and the message
  without the batch index (plus the `grpc-retry-pushback-ms` of a rate limit), the rest is sent again.
- A failed call (UNAVAILABLE, an overloaded ingest's RESOURCE_EXHAUSTED, a timeout) is retried after the
  ingest's pushback or an exponential backoff with jitter, on the next endpoint, until the batch's oldest
  beat has waited `deadline` seconds; then its beats fail with UNAVAILABLE and the agents' clients retry
  themselves (a heartbeat is a snapshot: the relay replays nothing). `deadline` stays below the client's
  5 s reply timeout, so an agent hears the relay's answer rather than its own timeout.
- The relay's own credentials refused (UNAUTHENTICATED, PERMISSION_DENIED or INVALID_ARGUMENT for the
  request as a whole): its beats fail with UNAVAILABLE at once, never with that code, because the clients
  stop beating for good on those codes, and the fault is the relay's, not the agents'.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import random
import re
import stat
import time
from collections.abc import Sequence
from typing import Any

import grpc

from heartbeat_registry.client import TlsConfig, _pushback_s, retry_delay
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.pb import hb, hb_grpc

log = logging.getLogger(__name__)

# how the ingest names a refused heartbeat of a batch (ingest/server.py `_at`), and its batch size limit
_REFUSED_AT = re.compile(r"heartbeats\[(\d+)\]\.(.*)", re.DOTALL)
_BATCH_LIMIT = re.compile(r"a batch holds 1 to (\d+)")
# refusals of the relay's request as a whole: waiting does not fix them, and they are not the agents' fault
_RELAY_REFUSED = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
SOCKET_MODE = 0o660  # the relay's owner and group: agents of the host in that group may beat through it


class RelayRefused(Exception):
    """A heartbeat the relay could not get acknowledged: `code` and `details` are what its agent is told
    (the ingest's refusal of that heartbeat, or UNAVAILABLE), `retry_ms` the pushback it should honour."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_ms: int = 0) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_ms = retry_ms


class RelayObserver:
    """What the relay reports as it works; `hbreg relay` turns it into Prometheus metrics."""

    def batch(self, size: int, seconds: float) -> None:
        """The ingest acknowledged a batch of `size` heartbeats after `seconds`."""

    def refused(self, code: grpc.StatusCode, count: int) -> None:
        """`count` heartbeats were answered with the error `code`."""

    def retried(self, code: grpc.StatusCode) -> None:
        """A BeatBatch call failed with `code` and will be tried again."""


class _Group:
    """A BeatBatch an agent-side batcher sent the relay: it travels in one upstream batch and is accepted
    or refused whole, as the ingest would."""

    __slots__ = ("agents", "beats", "future", "since")

    def __init__(self, beats: Sequence[hb.Heartbeat], future: asyncio.Future, since: float) -> None:
        self.beats = list(beats)
        self.agents = dict.fromkeys(b.agent_id for b in self.beats)  # in order, once each
        self.future = future
        self.since = since


# queued: (beat, future, submitted at) for a single heartbeat, or a _Group
_Item = tuple[hb.Heartbeat, "asyncio.Future[hb.BeatReply]", float] | _Group
# who waits for heartbeat i of a batch: its future, or its group
_Owner = asyncio.Future | _Group


class _Batch:
    __slots__ = ("agents", "beats", "owners", "since")

    def __init__(self, beats: list[hb.Heartbeat], owners: list[_Owner], agents: set[str], since: float) -> None:
        self.beats = beats
        self.owners = owners
        self.agents = agents  # busy until the batch is answered
        self.since = since  # when its oldest heartbeat was submitted


class _Upstream:
    """The ingest endpoints, in failover order, each with one channel opened when first used."""

    def __init__(self, endpoints: Sequence[str], token: str | None, tls: TlsConfig | None) -> None:
        self.endpoints = list(endpoints)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.tls = tls
        self.index = 0
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.index]

    def stub(self) -> hb_grpc.HeartbeatServiceStub:
        endpoint = self.endpoint
        channel = self._channels.get(endpoint)
        if channel is None:
            # the client library's channel options: keepalive, and no retries of grpc's own (ours decide)
            options = [("grpc.keepalive_time_ms", 20_000), ("grpc.enable_retries", 0)]
            if self.tls is not None:
                channel = grpc.aio.secure_channel(endpoint, self.tls.credentials(), options=options)
            else:
                channel = grpc.aio.insecure_channel(endpoint, options=options)
            self._channels[endpoint] = channel
        return hb_grpc.HeartbeatServiceStub(channel)

    def fail_over(self) -> None:
        self.index = (self.index + 1) % len(self.endpoints)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class Relay:
    """Queues heartbeats and sends them upstream as BeatBatch requests (see the module for the rules).

    `endpoints`: the ingest's `HOST:PORT`s (failover order); `token`: the relay token (`hbreg token NAME
    --relay-for 'host7-*'`); `flush`: seconds a heartbeat may wait for others to share its batch;
    `max_batch`: heartbeats per request (lowered by itself if the ingest allows fewer); `max_in_flight`:
    batches travelling at once; `deadline`: seconds a heartbeat may wait for the ingest before its agent
    is told UNAVAILABLE.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        token: str | None = None,
        tls: TlsConfig | None = None,
        flush: float = 0.005,
        max_batch: int = 1000,
        max_in_flight: int = 4,
        deadline: float = 3.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        observer: RelayObserver | None = None,
    ) -> None:
        endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not endpoints:
            raise ValueError("at least one ingest endpoint is needed")
        if flush < 0 or max_batch < 1 or max_in_flight < 1 or deadline <= 0:
            raise ValueError("flush must be >= 0, max_batch and max_in_flight >= 1, deadline > 0")
        self.flush = flush
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.deadline = deadline
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.observer = observer or RelayObserver()
        # did the last BeatBatch call get the batch (or its refusals) through? None: no call yet
        self.upstream_ok: bool | None = None
        self._upstream = _Upstream(endpoints, token, tls)
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued = 0  # heartbeats in the queue (a group counts each of its heartbeats)
        self._busy: set[str] = set()  # agents with a heartbeat in flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._sending: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rng = random.Random()

    @property
    def endpoint(self) -> str:
        """The ingest endpoint the next batch goes to."""
        return self._upstream.endpoint

    @property
    def queued(self) -> int:
        """Heartbeats waiting for a batch."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Batches waiting for the ingest."""
        return len(self._sending)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._runner = asyncio.create_task(self._run(), name="relay-flush")

    async def close(self, timeout: float | None = None) -> None:
        """Drain: refuse new heartbeats, send what is queued, wait for the ingest's answers (at most
        `timeout`, default `deadline` plus a second; what is still unanswered then fails UNAVAILABLE)."""
        if self._runner is None:
            return
        self._closing = True
        self._wake.set()
        until = time.monotonic() + (self.deadline + 1.0 if timeout is None else timeout)
        # the flush loop first (it sends what is queued, then ends), then every batch it started
        for tasks in ({self._runner}, self._sending):
            if tasks:
                _, late = await asyncio.wait(set(tasks), timeout=max(0.0, until - time.monotonic()))
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
        self._fail_queue(RelayRefused(grpc.StatusCode.UNAVAILABLE, "relay: stopped before the ingest answered"))
        self._runner = None
        await self._upstream.close()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- what the agents' calls do --------------------------------------------------------------------

    def _refuse_if_stopped(self) -> None:
        if self._closing or self._runner is None:
            raise RelayRefused(grpc.StatusCode.UNAVAILABLE, "relay: not running (stopping or not started)")

    async def submit(self, beat: hb.Heartbeat) -> hb.BeatReply:
        """The agent's reply once the ingest acknowledged the batch that carried `beat`; raises
        RelayRefused with what the agent should be told otherwise."""
        self._refuse_if_stopped()
        assert self._loop is not None
        future: asyncio.Future[hb.BeatReply] = self._loop.create_future()
        queue = self._queue
        queue.append((beat, future, time.monotonic()))
        self._queued += 1
        if len(queue) == 1 or self._queued == self.max_batch:
            self._wake.set()
        return await future

    async def submit_batch(self, beats: Sequence[hb.Heartbeat]) -> hb.BeatBatchReply:
        """A BeatBatch passed through: all of `beats` in one upstream batch, accepted or refused whole
        (a refusal names `heartbeats[i]` of these beats), and the reply carries their agents' directives."""
        self._refuse_if_stopped()
        if not beats or len(beats) > self.max_batch:
            code = grpc.StatusCode.INVALID_ARGUMENT if not beats else grpc.StatusCode.RESOURCE_EXHAUSTED
            self.observer.refused(code, len(beats))
            raise RelayRefused(code, f"heartbeats: {len(beats)} heartbeats; a batch holds 1 to {self.max_batch}")
        assert self._loop is not None
        group = _Group(beats, self._loop.create_future(), time.monotonic())
        self._queue.append(group)
        self._queued += len(group.beats)
        if len(self._queue) == 1 or self._queued >= self.max_batch:
            self._wake.set()
        reply: hb.BeatBatchReply = await group.future
        return reply

    # --- batching ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Every `flush` seconds after the oldest queued heartbeat (at once when `max_batch` are queued,
        or when closing), one batch goes out as soon as a slot is free."""
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._closing and self._queued < self.max_batch:
                oldest = queue[0]
                since = oldest.since if isinstance(oldest, _Group) else oldest[2]
                delay = since + self.flush - time.monotonic()
                if delay > 0:
                    self._wake.clear()
                    # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that arrives
                    # as the wake-up does (bpo-42130), and this loop would go on after being cancelled
                    # (it held `hbreg bench scale` up on SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                    continue
            await self._slots.acquire()
            batch = self._take()
            if batch is None:
                self._slots.release()
                if queue:  # all of it waits behind its agents' batches in flight: until one is answered
                    self._wake.clear()
                    await self._wake.wait()
                continue
            self._busy.update(batch.agents)
            task = asyncio.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def _take(self) -> _Batch | None:
        """The next batch from the front of the queue, skipping (in order) agents with a beat in flight."""
        queue, busy = self._queue, self._busy
        expired = time.monotonic() - self.deadline
        beats: list[hb.Heartbeat] = []
        owners: list[_Owner] = []
        agents: set[str] = set()
        held: list[_Item] = []
        blocked: set[str] = set()  # agents with a held item: their later items wait too
        since = float("inf")
        limit = self.max_batch
        while queue and len(beats) < limit:
            item = queue.popleft()
            if isinstance(item, _Group):
                size = len(item.beats)
                if item.future.done():
                    self._queued -= size
                    continue
                if any(a in busy or a in blocked for a in item.agents):
                    held.append(item)
                    blocked.update(item.agents)
                    continue
                if beats and len(beats) + size > limit:
                    queue.appendleft(item)
                    break
                self._queued -= size
                beats.extend(item.beats)
                owners.extend([item] * size)
                agents.update(item.agents)
                since = min(since, item.since)
                continue
            beat, future, submitted = item
            if future.done():  # the agent stopped waiting (its call was cancelled)
                self._queued -= 1
                continue
            if submitted < expired:  # waited behind slow batches for too long
                self._queued -= 1
                self._fail([future], self._unavailable("no BeatBatch slot came free"))
                continue
            agent = beat.agent_id
            if agent in busy or agent in blocked:
                held.append(item)
                blocked.add(agent)
                continue
            self._queued -= 1
            beats.append(beat)
            owners.append(future)
            agents.add(agent)
            if submitted < since:
                since = submitted
        queue.extendleft(reversed(held))
        return _Batch(beats, owners, agents, since) if beats else None

    def _unavailable(self, why: str) -> RelayRefused:
        return RelayRefused(
            grpc.StatusCode.UNAVAILABLE,
            f"relay: the ingest did not acknowledge within {self.deadline:g} s ({why}); retry",
        )

    # --- one batch, to its end ------------------------------------------------------------------------

    async def _send(self, batch: _Batch) -> None:
        try:
            await self._deliver(batch)
        except asyncio.CancelledError:
            self._fail(batch.owners, RelayRefused(grpc.StatusCode.UNAVAILABLE, "relay: stopped"))
            raise
        except Exception as exc:  # a bug must not leave agents waiting
            log.exception("relay batch failed")
            self._fail(batch.owners, RelayRefused(grpc.StatusCode.UNAVAILABLE, f"relay: {exc!r}"))
        finally:
            self._busy.difference_update(batch.agents)
            self._slots.release()
            self._wake.set()

    async def _deliver(self, batch: _Batch) -> None:
        upstream = self._upstream
        deadline_at = batch.since + self.deadline
        backoff = self.backoff_initial
        problem = "no answer"
        while batch.beats:
            remaining = deadline_at - time.monotonic()
            if remaining <= 0:
                self._fail(batch.owners, self._unavailable(problem))
                return
            started = time.monotonic()
            endpoint = upstream.endpoint
            try:
                reply = await upstream.stub().BeatBatch(
                    hb.BeatBatchRequest(heartbeats=batch.beats), timeout=remaining, metadata=upstream.metadata
                )
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                refused = _REFUSED_AT.match(details)
                if refused and int(refused.group(1)) < len(batch.beats):
                    self.upstream_ok = True
                    retry_ms = int(_pushback_s(exc) * 1000)
                    self._refuse_one(batch, int(refused.group(1)), code, refused.group(2), retry_ms)
                    continue
                limit = _BATCH_LIMIT.search(details)
                if limit and int(limit.group(1)) < len(batch.beats):
                    self.upstream_ok = True
                    self.max_batch = max(1, int(limit.group(1)))
                    log.warning("the ingest takes at most %d heartbeats per batch: smaller batches", self.max_batch)
                    self._requeue(batch)
                    return
                if code in _RELAY_REFUSED:
                    self.upstream_ok = False  # it answers, but takes nothing from this relay
                    log.error("the ingest %s refused the relay itself: %s: %s", endpoint, code.name, details)
                    error = f"relay: the ingest refused the relay's request ({code.name}: {details}); retry later"
                    self._fail(batch.owners, RelayRefused(grpc.StatusCode.UNAVAILABLE, error))
                    return
                self.upstream_ok = False
                self.observer.retried(code)
                problem = f"{endpoint}: {code.name}: {details}"
                upstream.fail_over()
                delay = retry_delay(_pushback_s(exc), backoff, self._rng)  # the client library's rule
                backoff = min(backoff * 2, self.backoff_max)
                log.warning("BeatBatch to %s failed: %s: %s; retrying in %.2f s", endpoint, code.name, details, delay)
                await asyncio.sleep(min(delay, max(0.0, deadline_at - time.monotonic())))
                continue
            self.upstream_ok = True
            self.observer.batch(len(batch.beats), time.monotonic() - started)
            self._answer(batch, reply)
            return

    def _answer(self, batch: _Batch, reply: hb.BeatBatchReply) -> None:
        """Each heartbeat its own reply: its seq, the batch's receive time, the directives naming its agent."""
        received = reply.received_ms
        directives: dict[str, list[hb.Directive]] = {}
        for directive in reply.directives:
            directives.setdefault(directive.agent_id, []).append(directive)
        groups: dict[_Group, None] = {}
        none: tuple[hb.Directive, ...] = ()
        for beat, owner in zip(batch.beats, batch.owners, strict=True):
            if isinstance(owner, _Group):
                groups[owner] = None
            elif not owner.done():
                answer = hb.BeatReply(seq=beat.seq, received_ms=received)
                if directives and beat.agent_id in directives:  # the rare case: most replies carry none
                    answer.directives.extend(directives[beat.agent_id])
                owner.set_result(answer)
        for group in groups:
            if not group.future.done():
                mine = [d for agent in group.agents for d in directives.get(agent, none)]
                group.future.set_result(
                    hb.BeatBatchReply(received_ms=received, accepted=len(group.beats), directives=mine)
                )

    def _refuse_one(self, batch: _Batch, index: int, code: grpc.StatusCode, rest: str, retry_ms: int) -> None:
        """Heartbeat `index` was refused: its agent (or its group, whole) gets the refusal, the rest stays."""
        owner = batch.owners[index]
        if isinstance(owner, _Group):
            error = RelayRefused(code, f"heartbeats[{index - batch.owners.index(owner)}].{rest}", retry_ms)
        else:
            error = RelayRefused(code, rest, retry_ms)
        keep = [i for i, o in enumerate(batch.owners) if o is not owner]
        self.observer.refused(code, len(batch.owners) - len(keep))
        self._settle(owner, error)
        batch.beats = [batch.beats[i] for i in keep]
        batch.owners = [batch.owners[i] for i in keep]

    def _requeue(self, batch: _Batch) -> None:
        """Back to the front of the queue, in order, for smaller batches; groups now too big fail."""
        items: list[_Item] = []
        seen: set[_Group] = set()
        for beat, owner in zip(batch.beats, batch.owners, strict=True):
            if not isinstance(owner, _Group):
                items.append((beat, owner, batch.since))
            elif owner not in seen:
                seen.add(owner)
                if len(owner.beats) > self.max_batch:
                    error = f"heartbeats: {len(owner.beats)} heartbeats; a batch holds 1 to {self.max_batch}"
                    self._settle(owner, RelayRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, error))
                else:
                    items.append(owner)
        self._queue.extendleft(reversed(items))
        self._queued += sum(len(i.beats) if isinstance(i, _Group) else 1 for i in items)

    def _settle(self, owner: _Owner, error: RelayRefused) -> None:
        future = owner.future if isinstance(owner, _Group) else owner
        if not future.done():
            future.set_exception(error)

    def _fail(self, owners: Sequence[_Owner], error: RelayRefused) -> None:
        if owners:
            self.observer.refused(error.code, len(owners))
        for owner in dict.fromkeys(owners):
            self._settle(owner, error)

    def _fail_queue(self, error: RelayRefused) -> None:
        owners: list[_Owner] = []
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Group):
                owners.extend([item] * len(item.beats))
            else:
                owners.append(item[1])
        self._queued = 0
        self._fail(owners, error)


# --- serving the agents of the host -------------------------------------------------------------------


class RelayService(hb_grpc.HeartbeatServiceServicer):
    """HeartbeatService for the agents of this host, answered through a Relay.

    Agents send no token here: whoever can reach the relay's address may speak for any agent its relay
    token covers. So the boundary is the Unix socket's permissions (mode 0660: the relay's user and group)
    or, on a loopback port, the host or pod itself; the ingest still checks every agent against the relay
    token's patterns, and a PERMISSION_DENIED reaches only the agent it names.
    """

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    async def Beat(self, request: hb.Heartbeat, context: grpc.aio.ServicerContext) -> hb.BeatReply:
        try:
            return await self._relay.submit(request)
        except RelayRefused as refusal:
            await _abort(context, refusal)
            raise  # not reached: abort raises

    async def BeatBatch(self, request: hb.BeatBatchRequest, context: grpc.aio.ServicerContext) -> hb.BeatBatchReply:
        try:
            return await self._relay.submit_batch(request.heartbeats)
        except RelayRefused as refusal:
            await _abort(context, refusal)
            raise

    async def BeatStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        # grpc's reader/writer API: no async-generator layers per message
        submit = self._relay.submit
        while (beat := await context.read()) is not grpc.aio.EOF:
            try:
                reply = await submit(beat)
            except RelayRefused as refusal:
                await _abort(context, refusal)
                return
            await context.write(reply)


async def _abort(context: grpc.aio.ServicerContext, refusal: RelayRefused) -> None:
    if refusal.retry_ms:
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(refusal.retry_ms)),))
    await context.abort(refusal.code, refusal.details)


def on_loopback(addr: str) -> bool:
    """`HOST:PORT` whose HOST is this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local(addr: str) -> bool:
    """`unix:PATH` / `unix:///PATH`, or `HOST:PORT` with a loopback HOST."""
    if addr.startswith("unix:"):
        return bool(addr[len("unix:") :].lstrip("/"))
    _, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        return False
    return on_loopback(addr)


def listen(server: grpc.aio.Server, addr: str) -> int:
    """Bind the relay's agent-facing address: a Unix socket created with mode 0660 (a stale socket file
    is replaced), or a loopback port; never anything else, since agents send no token here. Returns the
    bound port (0 for a socket)."""
    if not is_local(addr):
        raise ConfigError(f"relay address {addr!r}: expected unix:///PATH or a loopback HOST:PORT (no tokens here)")
    if not addr.startswith("unix:"):
        port = server.add_insecure_port(addr)
        if not port:
            raise OSError(f"cannot listen on {addr}")
        return int(port)
    path = addr[len("unix://") :] if addr.startswith("unix://") else addr[len("unix:") :]
    # the socket is created by bind() with the umask's mode: narrow it there, so it is never wider
    previous = os.umask(0o777 & ~SOCKET_MODE)
    try:
        server.add_insecure_port(addr)
    finally:
        os.umask(previous)
    os.chmod(path, SOCKET_MODE)
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise OSError(f"{path} is not a socket after binding")
    return 0
