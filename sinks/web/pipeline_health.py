"""The pipeline's own health, for the dashboard's header: what the processes' `/metrics` and `/healthz`
say (ingest rate, watermark ages, workers up), the end-to-end lag from the partitions' clocks, and
whether every Alertmanager member answers. Read every few seconds; a process that does not answer is
shown as down, never guessed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.settings import Settings

ACCEPTED = "hbreg_ingest_heartbeats_accepted_total"


def sample(text: str, name: str) -> float | None:
    """The sum of a metric's samples in a Prometheus text page (all its label sets)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


class PipelineHealth:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._accepted: tuple[float, float] | None = None  # (monotonic time, counter)
        self.latest: dict[str, Any] = {}

    async def _get(self, session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
        try:
            async with session.get(url) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return 0, ""

    async def read(self, clocks: dict[int, int]) -> dict[str, Any]:
        s = self.settings
        members = [u.strip().rstrip("/") for u in (s.alertmanager_url or "").split(",") if u.strip()]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            ingest, bridge, worker, worker_health, *ams = await asyncio.gather(
                self._get(session, f"http://{s.ingest_metrics_addr}/metrics"),
                self._get(session, f"http://{s.bridge_metrics_addr}/metrics"),
                self._get(session, f"http://{s.worker_web_addr}/metrics"),
                self._get(session, f"http://{s.worker_web_addr}/healthz"),
                *(self._get(session, f"{m}/-/healthy") for m in members),
            )
        rate = None
        accepted = sample(ingest[1], ACCEPTED) if ingest[0] == 200 else None
        if accepted is not None:
            now = time.monotonic()
            if self._accepted is not None and now > self._accepted[0]:
                rate = max(0.0, (accepted - self._accepted[1]) / (now - self._accepted[0]))
            self._accepted = (now, accepted)
        wall = now_ms()
        self.latest = {
            "ingest_up": ingest[0] == 200,
            "ingest_rate": None if rate is None else round(rate, 1),
            "bridge_up": bridge[0] == 200,
            "bridge_watermark_age_s": sample(bridge[1], "hbreg_bridge_watermark_age_seconds"),
            "workers_up": 1 if worker_health[0] == 200 else 0,
            "workers": 1,
            "worker_watermark_age_s": sample(worker[1], "hbreg_worker_watermark_age_seconds"),
            "lag_s": round((wall - min(clocks.values())) / 1000, 2) if clocks else None,
            "alertmanager": {"members": len(members), "up": sum(1 for status, _ in ams if status == 200)},
            "at_ms": wall,
        }
        return self.latest
