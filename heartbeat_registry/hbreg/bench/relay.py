"""`hbreg bench --modes relay`: what the host relay adds to an agent's round trip, and what it saves the
ingest. Against the ingest the ingest benchmark started (or was given), with a real `hbreg relay` process
on a Unix socket, from load processes separate from both:

- added latency: AGENTS agents beat every INTERVAL seconds over their own BeatStreams, every other one
  straight to the ingest, the rest through the relay, interleaved in the same load processes, so both
  halves meet the same machine and the same ingest at the same moments. `relay_added_*_ms` is a
  percentile through the relay minus the same percentile straight to the ingest (the goal: p99 <= 20 ms).
- throughput: STREAMS BeatStreams through the relay, each beating as fast as replies come: the relay's
  heartbeats/s and CPU, and the ingest's CPU per heartbeat while the relay batches for it (the `stream`
  mode gives the same figure without the relay).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import multiprocessing
import os
import random
import time
from typing import Any

from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.bench.common import hbreg_argv, latency_summary, metric, process, workdir

AGENTS = 2000  # half straight to the ingest, half through the relay
INTERVAL = 1.0
STREAMS = 500
LOAD_PROCS = 2
GOAL_ADDED_P99_MS = 20.0
FLUSH_S = 0.005  # the default of HBREG_RELAY_FLUSH


@dataclasses.dataclass(frozen=True)
class Plan:
    phase: str  # "added" or "throughput"
    ingest: str
    relay: str
    secret: str | None
    share: int  # this process's agents (or streams)
    offset: int  # its first agent number
    start_at: float  # wall clock: measurement starts (connections are warm by then)
    end_at: float


async def _load(plan: Plan) -> dict[str, Any]:
    import grpc

    from heartbeat_registry.beats import heartbeat
    from heartbeat_registry.pb import hb, hb_grpc

    latencies: dict[str, list[float]] = {"direct": [], "relay": []}
    errors: dict[str, int] = {}
    # at most 500 streams per connection, as real agents each hold their own anyway
    per_channel = 500
    count = max(1, plan.share // per_channel + 1)
    own = [("grpc.use_local_subchannel_pool", 1)]
    stubs = {
        target: [hb_grpc.HeartbeatServiceStub(grpc.aio.insecure_channel(addr, options=own)) for _ in range(count)]
        for target, addr in (("direct", plan.ingest), ("relay", plan.relay))
    }

    def metadata(agent: str) -> tuple:
        if not plan.secret:
            return ()
        from heartbeat_registry.core.tokens import mint

        return (("authorization", f"Bearer {mint(plan.secret.encode(), agent, 3600)}"),)

    async def agent(n: int) -> None:
        number = plan.offset + n
        target = "relay" if plan.phase == "throughput" or number % 2 else "direct"
        name = f"bench-{target[0]}{number}"
        pace = plan.phase == "added"
        if pace:  # spread the agents' connects and beats evenly over the interval
            await asyncio.sleep(random.uniform(0, INTERVAL))
        call = stubs[target][n % count].BeatStream(metadata=metadata(name) if target == "direct" else ())
        seq = 0
        try:
            while time.time() < plan.end_at:
                seq += 1
                sent, clock = time.time(), time.perf_counter()
                await call.write(heartbeat(name, f"{name}-task", hb.RUNNING, 0.5, seq=seq))
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                if sent >= plan.start_at and time.time() <= plan.end_at:
                    latencies[target].append(time.perf_counter() - clock)
                if pace:
                    await asyncio.sleep(max(0.0, sent + INTERVAL - time.time()))
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            key = f"{target}:{exc.code().name}"
            errors[key] = errors.get(key, 0) + 1

    await asyncio.gather(*(agent(n) for n in range(plan.share)))
    return {"latencies": latencies, "errors": errors}


def _run_load(plan: Plan) -> dict[str, Any]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(plan))


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    import psutil

    return float(sum(psutil.Process(pid).cpu_times()[:2]))


def _phase(phase: str, total: int, ingest: str, relay: str, secret: str | None, duration: float) -> list[dict]:
    warmup = INTERVAL + 3.0 if phase == "added" else 2.0
    start_at = time.time() + warmup
    end_at = start_at + duration
    plans = [
        Plan(phase, ingest, relay, secret, total // LOAD_PROCS, i * (total // LOAD_PROCS), start_at, end_at)
        for i in range(LOAD_PROCS)
    ]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(LOAD_PROCS, mp_context=context) as pool:
        return [f.result() for f in [pool.submit(_run_load, plan) for plan in plans]]


def run_mode(mode: str, addr: str, secret: str | None, duration: float, ingest_pid: int | None) -> dict[str, Any]:
    """Start `hbreg relay` in front of the ingest at `addr`, run both phases, stop it."""
    from heartbeat_registry.core.tokens import mint

    with workdir() as tmp:
        socket = f"unix://{tmp}/relay.sock"
        metrics_addr = f"127.0.0.1:{services.free_port()}"
        env = {
            **os.environ,
            "HBREG_GRPC_ADDR": addr,
            "HBREG_RELAY_ADDR": socket,
            "HBREG_RELAY_METRICS_ADDR": metrics_addr,
            "HBREG_STATE_DIR": str(tmp / "state"),
            "HBREG_RELAY_FLUSH": str(FLUSH_S),
            "HBREG_LOG_LEVEL": "WARNING",
        }
        if secret:
            env["HBREG_RELAY_TOKEN"] = mint(secret.encode(), "bench-relay", 3600, relay_for=("bench-r*",))
        with process(hbreg_argv("relay"), env, tmp / "relay.log") as relay:
            services.wait_port("127.0.0.1", int(metrics_addr.rpartition(":")[2]), 30, "relay")
            out: dict[str, Any] = {"agents": AGENTS, "interval_s": INTERVAL, "flush_ms": FLUSH_S * 1000}

            trips = metric(metrics_addr, "hbreg_relay_upstream_seconds_count")
            spent = metric(metrics_addr, "hbreg_relay_upstream_seconds_sum")
            results = _phase("added", AGENTS, addr, socket, secret, duration)
            trips = metric(metrics_addr, "hbreg_relay_upstream_seconds_count") - trips
            spent = metric(metrics_addr, "hbreg_relay_upstream_seconds_sum") - spent
            direct = [x for r in results for x in r["latencies"]["direct"]]
            relayed = [x for r in results for x in r["latencies"]["relay"]]
            straight, through = latency_summary(direct), latency_summary(relayed)
            out.update({f"direct_{k}": v for k, v in straight.items() if k != "p999_ms"})
            out.update({f"relay_{k}": v for k, v in through.items() if k != "p999_ms"})
            out["relay_added_p50_ms"] = round(through["p50_ms"] - straight["p50_ms"], 3)
            out["relay_added_p99_ms"] = round(through["p99_ms"] - straight["p99_ms"], 3)
            out["goal_added_p99_ms"] = GOAL_ADDED_P99_MS
            out["goal_met"] = out["relay_added_p99_ms"] <= GOAL_ADDED_P99_MS
            out["beats_direct"], out["beats_relay"] = len(direct), len(relayed)
            # of the relay's share: its BeatBatch round trip to the ingest, on average (the rest is the flush
            # wait and the relay's own gRPC work)
            out["relay_upstream_mean_ms"] = round(spent * 1000 / trips, 3) if trips else 0.0
            errors = _merge([r["errors"] for r in results])

            beats0 = metric(metrics_addr, "hbreg_relay_heartbeats_total")
            batches0 = metric(metrics_addr, "hbreg_relay_batches_total")
            cpu = {"relay": _cpu_seconds(relay.pid), "ingest": _cpu_seconds(ingest_pid)}
            started = time.monotonic()
            results = _phase("throughput", STREAMS, addr, socket, secret, duration)
            wall = time.monotonic() - started
            used = {"relay": _cpu_seconds(relay.pid) - cpu["relay"], "ingest": _cpu_seconds(ingest_pid) - cpu["ingest"]}
            beats = metric(metrics_addr, "hbreg_relay_heartbeats_total") - beats0
            batches = metric(metrics_addr, "hbreg_relay_batches_total") - batches0
            timed = [x for r in results for x in r["latencies"]["relay"]]
            out["throughput_streams"] = STREAMS
            out["throughput_hb_per_s"] = round(len(timed) / duration, 1)
            out.update({f"throughput_{k}": v for k, v in latency_summary(timed).items() if k != "p999_ms"})
            # CPU over the whole phase (its warm-up and wind-down too), per heartbeat the relay sent in it
            out["relay_cpu_pct"] = round(100 * used["relay"] / wall, 1)
            if ingest_pid is not None and beats:
                out["ingest_cpu_pct"] = round(100 * used["ingest"] / wall, 1)
                out["ingest_cpu_us_per_hb"] = round(1e6 * used["ingest"] / beats, 1)
            out["mean_batch"] = round(beats / batches, 1) if batches else 0.0
            errors = _merge([errors, *(r["errors"] for r in results)])
            if errors:
                out["errors"] = errors
        return out


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for found in counts:
        for key, value in found.items():
            total[key] = total.get(key, 0) + value
    return total
