"""What valkey.conf costs the ingest: `appendfsync always` against `everysec` and no append-only file, and
the memory and AOF bytes per stored heartbeat (for sizing maxmemory, disks and repl-backlog-size).

Starts `valkey-server` with valkey.conf beside this file (only port, dir, bind and the fsync policy set on
the command line), and drives it with the ingest's own group commit (`ingest.writer.StreamWriter`, the
WRITE_SHARD script, 8 shards, one call in flight per shard): many concurrent callers each waiting for
their heartbeats to be stored, exactly as the gRPC handlers do, minus gRPC. Two shapes:

- `beat`: 64 callers of 1 heartbeat each (unary Beat load): small commits, fsync per round trip shows;
- `batch`: 8 callers of 500 heartbeats each (BeatBatch load from relays).

Plus the pipelined one-heartbeat-per-XADD ceiling (`redis-benchmark`, as `hbreg bench ingest` measures
it) under each policy. Sizes: group commits of 1, 10, 100 and 500 heartbeats of a fleet of 20,000 agents
written into one shard, then MEMORY USAGE of the stream and the registry hash, and the AOF's growth.
Prints one JSON object; the figures in valkey.conf and docs/deployment.md come from
`.venv/bin/python infra/valkey/measure.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from heartbeat_registry.core.names import Names  # noqa: E402
from heartbeat_registry.hbreg import services  # noqa: E402
from heartbeat_registry.hbreg.bench.common import latency_summary  # noqa: E402
from heartbeat_registry.hbreg.bench.ingest import xadd_ceiling  # noqa: E402

CONFIG = pathlib.Path(__file__).resolve().parent / "valkey.conf"
SHAPES = {"beat": (64, 1), "batch": (8, 500)}  # callers, heartbeats per call
POLICIES = {
    "always": ["--appendonly", "yes", "--appendfsync", "always"],
    "everysec": ["--appendonly", "yes", "--appendfsync", "everysec"],
    "off": ["--appendonly", "no"],
}


@contextlib.contextmanager
def valkey(policy: str, data: pathlib.Path) -> Iterator[str]:
    port = services.free_port()
    data.mkdir(parents=True)
    argv = [services.valkey_binary(), str(CONFIG), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    proc = subprocess.Popen([*argv, *POLICIES[policy]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        services.wait_port("127.0.0.1", port, 15, "valkey")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)


async def group_commit(url: str, callers: int, per_call: int, duration: float) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from ingest.metrics import REDIS_ROUNDTRIP
    from ingest.writer import StreamWriter

    client = aioredis.Redis.from_url(url)
    writer = StreamWriter(client, Names("fsyncbench", "", 8), retention_s=60.0)
    writer.start()
    agents = [f"agent-{i:05d}" for i in range(20_000)]
    latencies: list[float] = []
    stored = 0
    end = time.monotonic() + duration

    async def caller() -> None:
        nonlocal stored
        while time.monotonic() < end:
            batch = writer.batch(int(time.time() * 1000))
            for agent in random.sample(agents, per_call):
                batch.add(agent, agent + "-task", 2, int(time.time() * 1000), 0.5, None, 1)
            started = time.perf_counter()
            await writer.write(batch)
            latencies.append(time.perf_counter() - started)
            stored += per_call

    round_trips = _count(REDIS_ROUNDTRIP)
    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(callers)))
    took = time.monotonic() - started
    round_trips = _count(REDIS_ROUNDTRIP) - round_trips
    await writer.close()
    await client.aclose()
    return {
        "heartbeats_per_s": round(stored / took),
        "caller_round_trip": latency_summary(latencies),
        # script calls, all shards: what `always` fsyncs for (several calls of one event-loop turn share one)
        "redis_calls_per_s": round(round_trips / took),
        "heartbeats_per_redis_call": round(stored / max(round_trips, 1), 1),
    }


async def sizes(url: str, per_entry: int, heartbeats: int) -> dict[str, float]:
    """Bytes per heartbeat in the stream and the AOF when each group commit (stream entry) holds
    `per_entry` heartbeats; the registry hash per agent once all 20,000 agents have beaten."""
    import redis.asyncio as aioredis

    from ingest.writer import StreamWriter

    client = aioredis.Redis.from_url(url)
    names = Names(f"size{per_entry}", "", 1)
    writer = StreamWriter(client, names, retention_s=86_400.0)
    writer.start()
    agents = [f"agent-{i:05d}" for i in range(20_000)]
    aof_before = (await client.info("persistence"))["aof_current_size"]
    for start in range(0, heartbeats, per_entry):
        batch = writer.batch(int(time.time() * 1000))
        for i in range(start, start + per_entry):
            agent = agents[i % len(agents)]
            batch.add(agent, agent + "-task-7", 2, int(time.time() * 1000), random.random(), None, i // len(agents))
        await writer.write(batch)
    await writer.close()
    aof = (await client.info("persistence"))["aof_current_size"] - aof_before
    stream = await client.memory_usage(names.stream(0), samples=0)
    latest = await client.memory_usage(names.latest(0), samples=0)
    await client.aclose()
    return {
        "stream_bytes_per_heartbeat": round(stream / heartbeats, 1),
        "aof_bytes_per_heartbeat": round(aof / heartbeats, 1),
        "registry_bytes_per_agent": round(latest / min(heartbeats, len(agents)), 1),
    }


def _count(histogram: Any) -> float:
    """Observations so far of a prometheus_client Histogram (its `_count` sample)."""
    return sum(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count"))


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over repeated runs (the machine is shared: single runs are noisy)."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        values = [row[key] for row in rows]
        if isinstance(value, dict):
            out[key] = median_row(values)
        elif value is None or None in values:
            out[key] = None
        else:
            out[key] = statistics.median(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per shape and policy")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the policies, in turn; medians")
    parser.add_argument("--xadd-requests", type=int, default=1_000_000, help="XADDs of the redis-benchmark run")
    parser.add_argument("--only", choices=("fsync", "sizes"), help="one half of the measurements")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "duration_s": args.duration}
    runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in POLICIES}
    with tempfile.TemporaryDirectory(prefix="valkey-measure-") as tmp:  # on disk here (ext4), not tmpfs
        for round_ in range(args.repeat if args.only != "sizes" else 0):
            # policies in turn, round after round, so that load from elsewhere spreads over all of them
            for policy in POLICIES:
                with valkey(policy, pathlib.Path(tmp) / f"{policy}-{round_}") as url:
                    row: dict[str, Any] = {}
                    for shape, (callers, per_call) in SHAPES.items():
                        row[shape] = asyncio.run(group_commit(url, callers, per_call, args.duration))
                    row["xadd_pipelined_per_s"] = xadd_ceiling(url, args.xadd_requests)
                    runs[policy].append(row)
        for policy, rows in runs.items():
            if rows:
                results[policy] = median_row(rows)
        if args.only != "fsync":
            with valkey("everysec", pathlib.Path(tmp) / "sizes") as url:
                results["sizes"] = {
                    f"{n}_per_entry": asyncio.run(sizes(url, n, 100_000 if n > 1 else 20_000))
                    for n in (1, 10, 100, 500)
                }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
