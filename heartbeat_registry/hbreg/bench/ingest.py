"""`hbreg bench` (ingest): heartbeats/s accepted and reply latency per RPC mode, from load processes
separate from the ingest, against the real ingest and Redis.

Modes:
- `beat`: 64 concurrent unary callers, each as fast as replies come.
- `batch`: 8 concurrent callers of BeatBatch with 500 heartbeats each.
- `stream`: 1,000 concurrent BeatStreams, each beating as fast as it gets replies.
- `fleet`: a reconnect storm: 20,000 agents (an ingest restart) open their BeatStreams within 2 s and then
  beat every 2 s (10,000/s), each retrying as the client library does (the ingest's pushback with the
  client's jitter, else backoff; a reply not in within the client's `rpc_timeout` counts in `timeouts`
  and makes it connect again). Besides the rate, it reports the refusals by status code and
  `all_back_s`: from the storm's start until every agent had a heartbeat accepted (null if some were
  still out after FLEET_STORM_MAX_S).
- `relay`: the host relay's added round trip and throughput (heartbeat_registry/hbreg/bench/relay.py).
Plus `xadd_ceiling_per_s`: a pipelined `redis-benchmark` XADD against the same Redis, when the binary exists.

`beat`, `stream` and `fleet` also run, in the same run and with the same load, against an empty servicer:
grpc.aio with the ingest's server options, no interceptor, no auth, no Redis, whose methods only answer.
Its figures (under `empty`) are the floor of grpcio's own cost per message on this machine;
`beat_vs_empty`, `stream_vs_empty` and `fleet_vs_empty` say how close the ingest comes to it. Nothing is
pinned to a core: the servers, Valkey and the two load processes share the machine alike in both runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import inspect
import multiprocessing
import os
import random
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc

from heartbeat_registry.client import AsyncHeartbeatClient
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.bench import relay as relay_bench
from heartbeat_registry.hbreg.bench.common import embedded_valkey, hbreg_argv, latency_summary, process, workdir
from heartbeat_registry.pb import hb, hb_grpc

MODES = ("beat", "batch", "stream", "fleet", "relay")
LOAD_PROCS = 2


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    addr: str
    secret: str | None
    share: int  # this process's callers / streams / agents
    offset: int  # first agent number of this process
    start_at: float  # wall clock: measurement starts (connections are warm by then)
    end_at: float
    storm_at: float = 0.0  # fleet: when the agents start connecting


SHAPE = {  # mode -> (total callers/streams/agents, heartbeats per request)
    "beat": (64, 1),
    "batch": (8, 500),
    "stream": (1000, 1),
    "fleet": (20_000, 1),
}
FLEET_INTERVAL = 2.0
FLEET_STORM_MAX_S = 60.0  # the fleet mode waits this long for every agent to be back
COMPARED = ("beat", "stream", "fleet")  # also run against the empty servicer
BEAT_STREAM = "/heartbeat.v1.HeartbeatService/BeatStream"  # called with bytes: no protobuf work in the load
_CLIENT = inspect.signature(AsyncHeartbeatClient).parameters  # the fleet retries as the client does
CLIENT_BACKOFF_INITIAL: float = _CLIENT["backoff_initial"].default
CLIENT_BACKOFF_MAX: float = _CLIENT["backoff_max"].default
CLIENT_RPC_TIMEOUT: float = _CLIENT["rpc_timeout"].default


def _metadata(secret: str | None, agent: str, relay: bool = False) -> tuple:
    if not secret:
        return ()
    from heartbeat_registry.core.tokens import mint

    token = mint(secret.encode(), agent, 3600, relay_for=("bench-*",) if relay else ())
    return (("authorization", f"Bearer {token}"),)


async def _load(plan: Plan) -> dict[str, Any]:
    import grpc

    from heartbeat_registry.beats import heartbeat
    from heartbeat_registry.client import _pushback_s, retry_delay

    accepted = timeouts = 0
    codes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    # at most 500 calls per connection: grpc's client refuses some streams beyond a few thousand on one
    # connection, and real agents each hold their own connection anyway
    channels = [
        grpc.aio.insecure_channel(plan.addr, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(4, plan.share // 500))
    ]
    per_request = SHAPE[plan.mode][1]
    back: list[float] = []  # fleet: when each agent had its first heartbeat accepted (wall clock)
    all_back = asyncio.Event()

    def beat(agent: str, seq: int) -> hb.Heartbeat:
        return heartbeat(agent, f"{agent}-task", hb.RUNNING, 0.5, seq=seq)

    def record(sent: float, now: float, count: int) -> None:
        nonlocal accepted
        if plan.start_at <= sent and now <= plan.end_at:
            accepted += count
            latencies.append(now - sent)

    async def unary_caller(n: int) -> None:
        # Requests are serialized once and re-sent as bytes: the load generator shares the machine
        # with the ingest and Redis, and building 500 protobuf messages per request in Python would
        # measure the generator instead of the ingest. The ingest parses and stores every copy anew.
        agent = f"bench-{plan.offset + n}"
        channel, md = channels[n % len(channels)], _metadata(plan.secret, agent, relay=plan.mode == "batch")
        if plan.mode == "batch":
            agents = [f"bench-{plan.offset * 1000 + n * 1000 + i}" for i in range(per_request)]
            payload = hb.BeatBatchRequest(heartbeats=[beat(a, 1) for a in agents]).SerializeToString()
            call = channel.unary_unary("/heartbeat.v1.HeartbeatService/BeatBatch")
        else:
            payload = beat(agent, 1).SerializeToString()
            call = channel.unary_unary("/heartbeat.v1.HeartbeatService/Beat")
        while time.time() < plan.end_at:
            sent = time.time()
            try:
                await call(payload, metadata=md)
                record(sent, time.time(), per_request)
            except grpc.aio.AioRpcError as exc:
                if sent >= plan.start_at:
                    codes[exc.code().name] += per_request
                await asyncio.sleep(0.01)

    async def streamer(n: int) -> None:
        agent = f"bench-{plan.offset + n}"
        payload = beat(agent, 1).SerializeToString()  # serialized once, as the unary callers do
        call = channels[n % len(channels)].stream_stream(BEAT_STREAM)(metadata=_metadata(plan.secret, agent))
        try:
            while time.time() < plan.end_at:
                sent = time.time()
                await call.write(payload)
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                record(sent, time.time(), 1)
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            if time.time() >= plan.start_at:
                codes[exc.code().name] += 1

    def fleet_over() -> bool:
        now = time.time()
        return now >= plan.end_at and (all_back.is_set() or now >= plan.storm_at + FLEET_STORM_MAX_S)

    async def fleet_agent(n: int) -> None:
        nonlocal timeouts
        # What AsyncHeartbeatClient does, minus CPU sampling and endpoint failover: one BeatStream,
        # a beat every interval once the previous one was answered, and after a failure the client's
        # own retry rule (the ingest's pushback with the client's jitter, else backoff with jitter).
        agent = f"bench-{plan.offset + n}"
        metadata = _metadata(plan.secret, agent)
        payload = beat(agent, 1).SerializeToString()
        rng = random.Random()
        backoff = CLIENT_BACKOFF_INITIAL
        # the storm: every agent of the fleet connects within one interval of the ingest coming up
        await asyncio.sleep(max(0.0, plan.storm_at - time.time()) + rng.uniform(0, FLEET_INTERVAL))
        while not fleet_over():
            call = channels[n % len(channels)].stream_stream(BEAT_STREAM)(metadata=metadata)
            answered = False
            pushback = 0.0
            try:
                while not fleet_over():
                    sent = time.time()
                    await call.write(payload)
                    reply = await asyncio.wait_for(call.read(), CLIENT_RPC_TIMEOUT)
                    if reply is grpc.aio.EOF:
                        break
                    now = time.time()
                    if not answered and not back[n]:
                        back[n] = now
                        if all(back):
                            all_back.set()
                    answered = True
                    record(sent, now, 1)
                    await asyncio.sleep(max(0.0, sent + FLEET_INTERVAL - time.time()))
                else:
                    return
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                pushback = _pushback_s(exc)
            except TimeoutError:
                timeouts += 1  # the client gives up on the stream and connects again, as a refused one
            finally:
                call.cancel()
            if answered:
                backoff = CLIENT_BACKOFF_INITIAL
            await asyncio.sleep(retry_delay(pushback, backoff, rng))
            backoff = min(backoff * 2, CLIENT_BACKOFF_MAX)

    if plan.mode == "fleet":
        back = [0.0] * plan.share
        worker = fleet_agent
    else:
        worker = streamer if plan.mode == "stream" else unary_caller
    await asyncio.gather(*(worker(n) for n in range(plan.share)))
    for channel in channels:
        await channel.close()
    return {"accepted": accepted, "latencies": latencies, "codes": codes, "back": back, "timeouts": timeouts}


def _run_load(plan: Plan) -> dict[str, Any]:
    from ingest.server import GC_THRESHOLDS

    # the fleet's load process holds 10,000 streams, as an ingest does: the same collector settings
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(plan))


def _sample(pid: int | None, stop: float, who: str) -> dict[str, float]:
    """CPU (% of one core) and peak resident memory of the server under test during a mode."""
    if pid is None:
        return {}
    import psutil

    proc = psutil.Process(pid)
    cpu_start = sum(proc.cpu_times()[:2])
    wall_start = time.monotonic()
    rss = 0
    while time.time() < stop:
        rss = max(rss, proc.memory_info().rss)
        time.sleep(0.25)
    cpu = (sum(proc.cpu_times()[:2]) - cpu_start) / (time.monotonic() - wall_start) * 100
    return {f"{who}_cpu_pct": round(cpu, 1), f"{who}_rss_mb": round(rss / 2**20, 1)}


def run_mode(
    mode: str, addr: str, secret: str | None, duration: float, server_pid: int | None, who: str = "ingest"
) -> dict[str, Any]:
    total, per_request = SHAPE[mode]
    storm_at = time.time() + 4.0  # the load processes are up and their tokens minted by then
    start_at = storm_at + FLEET_INTERVAL + 3.0 if mode == "fleet" else time.time() + 2.0
    end_at = start_at + duration
    plans = []
    for i in range(LOAD_PROCS):
        share = total // LOAD_PROCS + (1 if i < total % LOAD_PROCS else 0)
        plans.append(Plan(mode, addr, secret, share, i * (total // LOAD_PROCS + 1), start_at, end_at, storm_at))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(LOAD_PROCS, mp_context=context) as pool:
        futures = [pool.submit(_run_load, plan) for plan in plans]
        while time.time() < start_at:
            time.sleep(0.05)
        usage = _sample(server_pid, end_at, who)
        results = [f.result() for f in futures]
    latencies = [x for r in results for x in r["latencies"]]
    accepted = sum(r["accepted"] for r in results)
    codes: collections.Counter[str] = sum((r["codes"] for r in results), collections.Counter())
    out: dict[str, Any] = {"hb_per_s": round(accepted / duration, 1), **latency_summary(latencies)}
    out["refused"] = dict(codes)  # by status code (fleet: over the whole storm; else in the window)
    if mode == "fleet":
        out["timeouts"] = sum(r["timeouts"] for r in results)  # no reply within the client's rpc_timeout
        back = sorted(t - storm_at for r in results for t in r["back"] if t)
        out["agents_back"] = len(back)
        if back:
            out["back_p50_s"] = round(back[len(back) // 2], 2)
            out["back_p99_s"] = round(back[min(len(back) - 1, int(len(back) * 0.99))], 2)
        out["all_back_s"] = round(back[-1], 2) if len(back) == total else None
    if mode == "batch":
        out["heartbeats_per_request"] = per_request
    out.update(usage)
    return out


class EmptyService(hb_grpc.HeartbeatServiceServicer):
    """Answers and does nothing else: an empty reply per request, one per heartbeat of a stream."""

    async def Beat(self, request: hb.Heartbeat, context: grpc.aio.ServicerContext) -> hb.BeatReply:
        return hb.BeatReply()

    async def BeatBatch(self, request: hb.BeatBatchRequest, context: grpc.aio.ServicerContext) -> hb.BeatBatchReply:
        return hb.BeatBatchReply()

    async def BeatStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        async for _ in request_iterator:
            yield hb.BeatReply()


def _serve_empty(addr: str) -> None:
    from ingest.server import grpc_options

    async def main() -> None:
        server = grpc.aio.server(options=grpc_options(Settings.from_env(use_state=False)))
        hb_grpc.add_HeartbeatServiceServicer_to_server(EmptyService(), server)
        server.add_insecure_port(addr)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


@contextlib.contextmanager
def empty_servicer() -> Iterator[tuple[str, int]]:
    """The empty servicer in a process of its own, as the ingest runs: (address, pid)."""
    addr = f"127.0.0.1:{services.free_port()}"
    proc = multiprocessing.get_context("spawn").Process(target=_serve_empty, args=(addr,), daemon=True)
    proc.start()
    try:
        services.wait_port("127.0.0.1", int(addr.rpartition(":")[2]), 30, "empty servicer")
        assert proc.pid is not None
        yield addr, proc.pid
    finally:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def xadd_ceiling(redis_url: str, requests: int = 2_000_000) -> float | None:
    """Pipelined XADD rate of this Redis, as redis-benchmark/valkey-benchmark measures it."""
    binary = shutil.which("valkey-benchmark") or shutil.which("redis-benchmark")
    if binary is None:
        return None
    hostport = redis_url.split("://", 1)[1].split("/")[0]
    host, _, port = hostport.rpartition(":")
    key = f"hbreg-bench-xadd-{secrets.token_hex(4)}"
    # one heartbeat per entry, with a heartbeat's fields: what a per-heartbeat XADD design could reach
    out = subprocess.run(
        [
            binary,
            "-h",
            host or "127.0.0.1",
            "-p",
            port or "6379",
            "-n",
            str(requests),
            "-P",
            "16",
            "-q",
            "XADD",
            key,
            "MAXLEN",
            "~",
            "100000",
            "*",
            "agent_id",
            "agent-00042",
            "task_id",
            "agent-00042-task-7",
            "status",
            "2",
            "timestamp",
            "1795622000000",
            "cpu_util",
            "0.5",
            "received_ms",
            "1795622000001",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    redis_client.connect_sync(redis_url).delete(key)
    rates = re.findall(r"([\d.]+) requests per second", out)
    return float(rates[-1]) if rates else None


def run(modes: list[str], duration: float, redis_url: str | None, grpc_addr: str | None) -> dict[str, Any]:
    """Start what was not given (Valkey, an ingest), run each mode, measure the XADD ceiling."""
    with workdir() as tmp:
        results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "duration_s": duration}
        with contextlib.ExitStack() as stack:
            if redis_url is None:
                redis_url = stack.enter_context(embedded_valkey(tmp))
            secret = os.environ.get("HBREG_AUTH_SECRET")
            ingest_pid = None
            if grpc_addr is None:
                grpc_addr = f"127.0.0.1:{services.free_port()}"
                secret = secrets.token_urlsafe(32)
                env = {
                    **os.environ,
                    "HBREG_REDIS_URL": redis_url,
                    "HBREG_GRPC_ADDR": grpc_addr,
                    "HBREG_AUTH_SECRET": secret,
                    "HBREG_KEY_PREFIX": "bench",
                    # the stream mode beats each agent as fast as replies come
                    "HBREG_RATE_LIMIT": "100000",
                    "HBREG_RATE_BURST": "100000",
                    "HBREG_INGEST_METRICS_ADDR": f"127.0.0.1:{services.free_port()}",
                    "HBREG_LOG_LEVEL": "WARNING",
                }
                proc = stack.enter_context(process(hbreg_argv("ingest"), env, tmp / "ingest.log"))
                services.wait_port("127.0.0.1", int(grpc_addr.rpartition(":")[2]), 30, "ingest")
                ingest_pid = proc.pid
            if any(mode in COMPARED for mode in modes):
                empty_addr, empty_pid = stack.enter_context(empty_servicer())
            for mode in modes:
                measure = relay_bench.run_mode if mode == "relay" else run_mode
                results[mode] = measure(mode, grpc_addr, secret, duration, ingest_pid)
                if mode in COMPARED:  # the same load right after, against the empty servicer
                    floor = run_mode(mode, empty_addr, secret, duration, empty_pid, who="server")
                    results.setdefault("empty", {})[mode] = floor
                    rate = floor["hb_per_s"]
                    results[f"{mode}_vs_empty"] = round(results[mode]["hb_per_s"] / rate, 3) if rate else None
            ceiling = xadd_ceiling(redis_url)
            if ceiling is not None:
                results["xadd_ceiling_per_s"] = ceiling
                if "batch" in results:
                    results["batch"]["pct_of_xadd_ceiling"] = round(100 * results["batch"]["hb_per_s"] / ceiling, 1)
        return results
