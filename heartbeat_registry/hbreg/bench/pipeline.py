"""`hbreg bench pipeline`: the processing path's throughput and latency.

- `bridge_hb_per_s`: one bridge process forwarding a pre-filled Redis Streams backlog to Kafka.
- `worker_hb_per_s` / `workers2_hb_per_s`: one / two faust workers working off a pre-filled `heartbeats`
  backlog (20,000 agents beating every 2 s of simulated time), windows and liveness on, until every
  record is acknowledged (offsets committed only after the windows it fed were written).
- `hb_to_table_p50_ms` / `hb_to_table_p99_ms`: live at 10,000 heartbeats/s through the whole pipeline,
  from a heartbeat's acknowledgement to its count in its window row, read through the query API.
- `worker_live_10000_cpu_pct` / `worker_live_20000_cpu_pct`: the worker's CPU (% of one core) live at
  10,000 and 20,000 heartbeats/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from heartbeat_registry.beats import heartbeat, now_ms
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import ensure_topics, pipeline_topics
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.bench.common import (
    base_settings,
    isolated,
    latency_summary,
    metric,
    service,
    wait_worker,
    workdir,
)
from heartbeat_registry.pb import hb

AGENTS = 20_000
INTERVAL_MS = 2000
PER_RECORD = 500


def synthetic(total: int, partitions: int) -> Iterator[tuple[int, hb.HeartbeatColumns]]:
    """`total` heartbeats of AGENTS agents beating every 2 s, ending now, as (partition, columns) of
    PER_RECORD heartbeats, in time order; each carries the watermark of its moment, each heartbeat its
    agent's seq."""
    agents = [f"agent-{i:05d}" for i in range(AGENTS)]
    part = [partition_of(a, partitions) for a in agents]
    per_ms = AGENTS / INTERVAL_MS
    span = int(total / per_ms)
    start = now_ms() - span - 5000
    buffers: dict[int, hb.HeartbeatColumns] = {}
    sent = 0
    t = 0
    while sent < total:
        for i in range(AGENTS):
            if sent >= total:
                break
            received = start + t + int(i / per_ms) % INTERVAL_MS
            p = part[i]
            cols = buffers.setdefault(p, hb.HeartbeatColumns())
            cols.agent_id.append(agents[i])
            cols.task_id.append(f"{agents[i]}-task")
            cols.status.append(hb.RUNNING)
            cols.timestamp.append(received)
            cols.cpu_util.append(0.3 + (i % 50) / 100)
            cols.progress.append(float("nan"))
            cols.received_ms.append(received)
            cols.seq.append(t // INTERVAL_MS + 1)
            sent += 1
            if len(cols.agent_id) >= PER_RECORD:
                cols.watermark_ms = received - 200
                yield p, cols
                del buffers[p]
        t += INTERVAL_MS
    for p, cols in buffers.items():
        cols.watermark_ms = cols.received_ms[-1] - 200
        yield p, cols
    final = start + t + 4 * INTERVAL_MS + 30_000  # closes every window of the backlog
    for p in range(partitions):  # the worker ticks its quiet partitions itself until the rows are written
        yield p, hb.HeartbeatColumns(watermark_ms=final)


async def bridge_rate(settings: Settings, total: int, log_dir: Any) -> float:
    names = Names.of(settings)
    assert settings.redis_url is not None
    client = redis_client.connect(settings)
    pipe = client.pipeline(transaction=False)
    for _, cols in synthetic(total, settings.stream_shards):
        if not cols.agent_id:
            continue
        shard = partition_of(cols.agent_id[0], settings.stream_shards)
        pipe.xadd(
            names.stream(shard), {"b": cols.SerializeToString(), "n": len(cols.agent_id), "r": cols.received_ms[-1]}
        )
        if len(pipe) >= 200:
            await pipe.execute()
    await pipe.execute()
    entries = sum([await client.xlen(s) for s in names.streams()])
    with service(settings, "bridge", log_dir):
        first = time.monotonic()  # until the bridge took its first entry
        started = False
        while True:
            await asyncio.sleep(0.05)
            left = 0
            for stream in names.streams():
                groups = await client.xinfo_groups(stream)
                group = next((g for g in groups if g["name"].decode() == names.bridge_group), None)
                left += (group["lag"] or 0) + group["pending"] if group else await client.xlen(stream)
            if not started and left < entries:
                first, started = time.monotonic(), True
            if left == 0:
                break
    await client.aclose()
    return total / (time.monotonic() - first)


async def produce_backlog(settings: Settings, total: int) -> None:
    from aiokafka import AIOKafkaProducer

    names = Names.of(settings)
    assert settings.kafka_bootstrap is not None
    await ensure_topics(settings.kafka_bootstrap, pipeline_topics(names, settings.topic_partitions))
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=10,
        max_request_size=4 * 1024 * 1024,
        max_batch_size=1024 * 1024,
    )
    await producer.start()
    try:
        sends = [
            await producer.send(names.heartbeats_topic, cols.SerializeToString(), partition=p)
            for p, cols in synthetic(total, settings.topic_partitions)
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def _committed_all(settings: Settings) -> bool:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    names = Names.of(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=names.processors_app_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(names.heartbeats_topic, p) for p in range(settings.topic_partitions)]
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            committed = await consumer.committed(tp)
            if (committed or 0) < ends[tp]:
                return False
        return True
    finally:
        await consumer.stop()


async def worker_rate(settings: Settings, total: int, workers: int, log_dir: Any) -> float:
    await produce_backlog(settings, total)
    with contextlib.ExitStack() as stack:
        addrs, procs = [], []
        for _ in range(workers):
            own = dataclasses.replace(settings, worker_web_addr=f"127.0.0.1:{services.free_port()}")
            addrs.append(own.worker_web_addr)
            procs.append(stack.enter_context(service(own, "worker", log_dir)))
        first = time.monotonic()  # until the first heartbeat was folded in
        started = False
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if any(proc.poll() is not None for proc in procs):
                codes = [proc.poll() for proc in procs]
                raise RuntimeError(f"a worker exited during the benchmark: exit codes {codes}, logs in {log_dir}")
            seen = sum(metric(a, "hbreg_worker_heartbeats_total") for a in addrs)
            if not started and seen > 0:
                first, started = time.monotonic(), True
            if seen >= total and await _committed_all(settings):
                return total / (time.monotonic() - first)
    raise TimeoutError("the workers did not finish the backlog within 10 minutes")


async def live(settings: Settings, seconds: float, log_dir: Any, interval_s: float, probe: bool) -> dict[str, float]:
    """AGENTS agents beating every `interval_s` (sent as relay batches of 1,000) through the whole
    pipeline; with `probe`, four probe agents measure acknowledgement -> count visible in the window row
    via the query API."""
    import grpc
    import psutil

    from heartbeat_registry.pb import hb_grpc

    with contextlib.ExitStack() as stack:
        running = {
            c: stack.enter_context(service(settings, c, log_dir)) for c in ("ingest", "bridge", "worker", "query")
        }
        for addr in (settings.grpc_addr, settings.http_addr):
            host, _, port = addr.rpartition(":")
            services.wait_port(host, int(port), 60, addr)
        await asyncio.to_thread(wait_worker, settings.worker_web_addr)
        agents = [f"live-{i:05d}" for i in range(AGENTS)]
        slots = [agents[k::20] for k in range(20)]  # slot k beats at k * 100 ms of every 2 s
        stop = asyncio.Event()
        latencies: list[float] = []

        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)

            async def load() -> None:
                k = 0
                next_at = time.monotonic()
                while not stop.is_set():
                    stamp = now_ms()
                    batch = hb.BeatBatchRequest(
                        heartbeats=[heartbeat(a, "t", hb.RUNNING, 0.4, timestamp=stamp) for a in slots[k % 20]]
                    )
                    await stub.BeatBatch(batch)
                    k += 1
                    next_at += interval_s / 20
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))

            async def probe_agent(agent: str) -> None:
                while not stop.is_set():
                    reply = await stub.Beat(heartbeat(agent, "t", hb.RUNNING, 0.5))
                    acked = time.monotonic()
                    start = reply.received_ms - reply.received_ms % int(settings.window_size * 1000)
                    url = f"http://{settings.http_addr}/api/windows?agent={agent}&from={start}&to={start}"
                    before = counts.get((agent, start), 0)
                    while time.monotonic() - acked < 5:
                        rows = await asyncio.to_thread(_get_json, url)
                        beats = next((r["beats"] for r in rows.get("windows", []) if r["window_start_ms"] == start), 0)
                        if beats > before:
                            latencies.append(time.monotonic() - acked)
                            counts[(agent, start)] = beats
                            break
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(0.3)

            counts: dict[tuple[str, int], int] = {}
            loader = asyncio.create_task(load())
            await asyncio.sleep(5)  # warm up
            worker = psutil.Process(running["worker"].pid)
            cpu_before = sum(worker.cpu_times()[:2])
            wall = time.monotonic()
            probes = [asyncio.create_task(probe_agent(f"probe-{n}")) for n in range(4 if probe else 0)]
            await asyncio.sleep(seconds)
            cpu = (sum(worker.cpu_times()[:2]) - cpu_before) / (time.monotonic() - wall) * 100
            stop.set()
            await asyncio.gather(loader, *probes, return_exceptions=True)
        rate = int(AGENTS / interval_s)
        if not probe:
            return {f"worker_live_{rate}_cpu_pct": round(cpu, 1)}
        summary = latency_summary(latencies)
        return {
            "hb_to_table_p50_ms": summary["p50_ms"],
            "hb_to_table_p99_ms": summary["p99_ms"],
            "hb_to_table_samples": len(latencies),
            f"worker_live_{rate}_cpu_pct": round(cpu, 1),
        }


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except OSError:
        return {}


def run(total: int, live_seconds: float, redis_url: str | None, kafka_bootstrap: str | None) -> dict[str, Any]:
    with workdir() as tmp, contextlib.ExitStack() as stack:
        base = base_settings(stack, tmp, redis_url, kafka_bootstrap)
        results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "heartbeats": total, "agents": AGENTS}
        results["bridge_hb_per_s"] = round(asyncio.run(bridge_rate(isolated(base, "b"), total, tmp)), 1)
        results["worker_hb_per_s"] = round(asyncio.run(worker_rate(isolated(base, "w"), total, 1, tmp)), 1)
        results["workers2_hb_per_s"] = round(asyncio.run(worker_rate(isolated(base, "x"), total, 2, tmp)), 1)
        results.update(asyncio.run(live(isolated(base, "l"), live_seconds, tmp, interval_s=2.0, probe=True)))
        results.update(asyncio.run(live(isolated(base, "m"), live_seconds, tmp, interval_s=1.0, probe=False)))
        return results
