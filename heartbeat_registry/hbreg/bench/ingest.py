"""`hbreg bench` (ingest): heartbeats/s accepted and reply latency per RPC mode, from load processes
separate from the ingest, against the real ingest and Redis.

Modes:
- `beat`: 64 concurrent unary callers, each as fast as replies come.
- `batch`: 8 concurrent callers of BeatBatch with 500 heartbeats each.
- `stream`: 1,000 concurrent BeatStreams, each beating as fast as it gets replies.
- `fleet`: 20,000 agents, each holding its own BeatStream and beating every 2 s (10,000/s).
Plus `xadd_ceiling_per_s`: a pipelined `redis-benchmark` XADD against the same Redis, when the binary exists.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import random
import re
import secrets
import shutil
import subprocess
import time
from typing import Any

from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.bench.common import embedded_valkey, hbreg_argv, latency_summary, process, workdir

MODES = ("beat", "batch", "stream", "fleet")
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


SHAPE = {  # mode -> (total callers/streams/agents, heartbeats per request)
    "beat": (64, 1),
    "batch": (8, 500),
    "stream": (1000, 1),
    "fleet": (20_000, 1),
}
FLEET_INTERVAL = 2.0


def _metadata(secret: str | None, agent: str, relay: bool = False) -> tuple:
    if not secret:
        return ()
    from heartbeat_registry.core.tokens import mint

    token = mint(secret.encode(), agent, 3600, relay_for=("bench-*",) if relay else ())
    return (("authorization", f"Bearer {token}"),)


async def _load(plan: Plan) -> dict[str, Any]:
    import grpc

    from heartbeat_registry.beats import heartbeat
    from heartbeat_registry.pb import hb, hb_grpc

    accepted = refused = 0
    codes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    # at most 500 calls per connection: grpc's client refuses some streams beyond a few thousand on one
    # connection, and real agents each hold their own connection anyway
    channels = [
        grpc.aio.insecure_channel(plan.addr, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(4, plan.share // 500))
    ]
    stubs = [hb_grpc.HeartbeatServiceStub(c) for c in channels]
    per_request = SHAPE[plan.mode][1]

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
        nonlocal refused
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
                    refused += per_request
                    codes[exc.code().name] += 1
                await asyncio.sleep(0.01)

    async def streamer(n: int) -> None:
        nonlocal refused
        agent = f"bench-{plan.offset + n}"
        metadata = _metadata(plan.secret, agent)
        seq = 0
        if plan.mode == "fleet":  # spread the fleet's connects and beats evenly over the interval
            await asyncio.sleep(random.uniform(0, FLEET_INTERVAL))
        call = stubs[n % len(stubs)].BeatStream(metadata=metadata)
        try:
            while time.time() < plan.end_at:
                seq += 1
                sent = time.time()
                await call.write(beat(agent, seq))
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                record(sent, time.time(), 1)
                if plan.mode == "fleet":
                    await asyncio.sleep(max(0.0, sent + FLEET_INTERVAL - time.time()))
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
            if time.time() >= plan.start_at:
                refused += 1

    worker = streamer if plan.mode in ("stream", "fleet") else unary_caller
    await asyncio.gather(*(worker(n) for n in range(plan.share)))
    for channel in channels:
        await channel.close()
    return {"accepted": accepted, "refused": refused, "latencies": latencies, "codes": codes}


def _run_load(plan: Plan) -> dict[str, Any]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(plan))


def _sample_ingest(pid: int | None, stop: float) -> dict[str, float]:
    """CPU (% of one core) and peak resident memory of the ingest during a mode."""
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
    return {"ingest_cpu_pct": round(cpu, 1), "ingest_rss_mb": round(rss / 2**20, 1)}


def run_mode(mode: str, addr: str, secret: str | None, duration: float, ingest_pid: int | None) -> dict[str, Any]:
    total, per_request = SHAPE[mode]
    warmup = FLEET_INTERVAL + 3.0 if mode == "fleet" else 2.0
    start_at = time.time() + warmup
    end_at = start_at + duration
    plans = []
    for i in range(LOAD_PROCS):
        share = total // LOAD_PROCS + (1 if i < total % LOAD_PROCS else 0)
        plans.append(Plan(mode, addr, secret, share, i * (total // LOAD_PROCS + 1), start_at, end_at))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(LOAD_PROCS, mp_context=context) as pool:
        futures = [pool.submit(_run_load, plan) for plan in plans]
        while time.time() < start_at:
            time.sleep(0.05)
        usage = _sample_ingest(ingest_pid, end_at)
        results = [f.result() for f in futures]
    latencies = [x for r in results for x in r["latencies"]]
    accepted = sum(r["accepted"] for r in results)
    out = {
        "hb_per_s": round(accepted / duration, 1),
        **latency_summary(latencies),
        "refused": sum(r["refused"] for r in results),
    }
    codes: collections.Counter[str] = sum((r["codes"] for r in results), collections.Counter())
    if codes:
        out["errors"] = dict(codes)
    if mode == "batch":
        out["heartbeats_per_request"] = per_request
    out.update(usage)
    return out


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
    import redis

    redis.Redis.from_url(redis_url).delete(key)
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
            for mode in modes:
                results[mode] = run_mode(mode, grpc_addr, secret, duration, ingest_pid)
            ceiling = xadd_ceiling(redis_url)
            if ceiling is not None:
                results["xadd_ceiling_per_s"] = ceiling
                if "batch" in results:
                    results["batch"]["pct_of_xadd_ceiling"] = round(100 * results["batch"]["hb_per_s"] / ceiling, 1)
        return results
