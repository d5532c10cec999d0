"""`hbreg bench tune`: how fast `hbreg tune` replays, from Kafka.

A `heartbeats` backlog of `--heartbeats` (20,000 agents beating every 2 s of simulated time, as the
pipeline benchmark writes it) is replayed by `hbreg tune`'s own code with one parameter set (the live
settings) and with five (a grid of four more), one process per core:
- `sets_1` / `sets_5`: seconds, and heartbeats per second per parameter set per core (the goal: 200,000);
- `hour_of_10000_agents_s`: what that rate means for an hour of a 10,000-agent fleet beating every second
  (36 million heartbeats), one parameter set, on this machine's cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from heartbeat_registry.beats import now_ms
from heartbeat_registry.hbreg.bench.common import base_settings, isolated, workdir
from heartbeat_registry.hbreg.bench.pipeline import produce_backlog
from heartbeat_registry.hbreg.tune import run as tune_run

GRID = ["stall_timeout=3s,10s", "phi_threshold=6,12"]


def run(heartbeats: int, redis_url: str | None, kafka_bootstrap: str | None) -> dict[str, Any]:
    with workdir() as tmp, contextlib.ExitStack() as stack:
        settings = isolated(base_settings(stack, tmp, redis_url, kafka_bootstrap), "t")
        started = now_ms()
        asyncio.run(produce_backlog(settings, heartbeats))
        # the backlog's simulated time ends now and reaches back heartbeats / 10,000 per second
        period = tune_run.Period(started - heartbeats // 10 - 60_000, now_ms(), 0, 0)
        results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "heartbeats": heartbeats}
        for name, grid in (("sets_1", []), ("sets_5", GRID)):
            out = tune_run.tune(settings, period, grid, show_progress=False)
            replay = out["replay"]
            results[name] = {
                "seconds": replay["seconds"],
                "processes": replay["processes"],
                "heartbeats_read": replay["heartbeats_read"],
                "hb_per_s_per_set_per_core": replay["heartbeats_per_s_per_set_per_core"],
            }
        rate = results["sets_1"]["hb_per_s_per_set_per_core"] * results["sets_1"]["processes"]
        results["hour_of_10000_agents_s"] = round(36_000_000 / rate, 1) if rate else None
        return results
