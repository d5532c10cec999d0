"""`hbreg bench dashboard`: the Monitor Dashboard with a big fleet, measured in a real browser (Debian's
Chromium driven by Playwright).

The fleet is written where the workers publish it (the `query_agents` views), and kept beating: every
agent's last-seen time is rewritten every second, so every live tick carries changes as in production.
- `first_render_ms`: navigation start -> the fleet table shows every agent (p50 and max of a few loads);
- `scroll_frame_ms`: frame times while the table is scrolled fast, 2,500 px per frame;
- `update_to_screen_ms`: `--changes` agents turn stalled, one at a time at 100 per second; each one's
  latency runs from its write to Redis to the moment the page's header count includes it (the page's
  clock and ours are the same machine's); the floor is the broadcaster's tick (`tick_ms`);
- `page`: the page's JS heap and DOM size after all of it (Chrome's own Performance metrics);
- `server_tick_ms`: the broadcaster's time to read the fleet and push the changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from typing import Any

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.views import ALIVE, STALLED, AgentView
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg.bench.common import base_settings, isolated, latency_summary, workdir
from sinks.web import live
from sinks.web.server import QueryServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHANGE_RATE = 100.0  # changes per second
LOADS = 3

# Records, in the page, when the header's stalled count moves (wall clock, as our writes are stamped).
WATCH_STALLED = """() => {
    window.__stalled = [];
    const read = () => Number(document.querySelector("#counts .s-stalled b")?.textContent ?? "0");
    let last = read();
    new MutationObserver(() => {
        const now = read();
        if (now !== last) { last = now; window.__stalled.push([Date.now(), now]); }
    }).observe(document.getElementById("counts"), {childList: true, subtree: true, characterData: true});
}"""

SCROLL = """async () => {
    const scroller = document.getElementById("fleet-scroll");
    const times = [];
    let last = performance.now();
    for (let i = 0; i < 120; i++) {
        scroller.scrollTop = (scroller.scrollTop + 2500) % scroller.scrollHeight;
        await new Promise(requestAnimationFrame);
        const now = performance.now();
        times.push(now - last);
        last = now;
    }
    times.sort((a, b) => a - b);
    return {p50: times[60], p95: times[114], max: times[119]};
}"""


def agent_name(i: int) -> str:
    return f"big-{i:05d}"


class FakeFleet:
    """`count` agents as the workers publish them, beating (last seen rewritten every second)."""

    def __init__(self, settings: Settings, count: int) -> None:
        assert settings.redis_url is not None
        self.redis = redis_client.connect(settings)
        self.names = Names.of(settings)
        self.partitions = settings.topic_partitions
        now = now_ms()
        self.views = {
            agent_name(i): AgentView(f"{agent_name(i)}-task", 1, (i % 90) / 100, now, ALIVE, "", now, None, None)
            for i in range(count)
        }

    def _key(self, agent: str) -> str:
        return self.names.query_agents_of(agent, self.partitions)

    async def write(self, agents: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for agent in agents:
            pipe.hset(self._key(agent), agent, self.views[agent].encode())
        await pipe.execute()

    async def beat(self) -> None:
        """Every agent not stalled seen now, spread over each second."""
        agents = list(self.views)
        chunk = max(1, len(agents) // 10)
        while True:
            for start in range(0, len(agents), chunk):
                now = now_ms()
                batch = agents[start : start + chunk]
                for agent in batch:
                    view = self.views[agent]
                    if view.state == ALIVE:
                        self.views[agent] = view._replace(last_seen=now)
                await self.write(batch)
                await asyncio.sleep(0.1)

    async def stall(self, agent: str) -> int:
        """`agent` turns stalled; returns when (wall ms) it was written."""
        now = now_ms()
        self.views[agent] = self.views[agent]._replace(state=STALLED, reason="silent", since=now)
        await self.write([agent])
        return now


async def page_metrics(page: Any) -> dict[str, float]:
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Performance.enable")
    metrics = {m["name"]: m["value"] for m in (await cdp.send("Performance.getMetrics"))["metrics"]}
    return {
        "js_heap_used_mb": round(metrics["JSHeapUsedSize"] / 2**20, 1),
        "js_heap_total_mb": round(metrics["JSHeapTotalSize"] / 2**20, 1),
        "dom_nodes": int(metrics["Nodes"]),
    }


async def measure(settings: Settings, agents: int, changes: int) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    fleet = FakeFleet(settings, agents)
    await fleet.write(list(fleet.views))
    server = QueryServer(settings)
    await server.start()
    beating = asyncio.create_task(fleet.beat())
    url = f"http://{settings.http_addr}/"
    results: dict[str, Any] = {"agents": agents, "changes": changes, "tick_ms": live.TICK_S * 1000}
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            # bypass_csp: Playwright's waits evaluate strings, which the page's CSP rightly forbids
            page = await browser.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            renders = []
            for _ in range(LOADS):
                started = time.monotonic()
                await page.goto(url)
                await page.wait_for_function(
                    f"document.getElementById('fleet-count').textContent.startsWith('{agents} of')", polling="raf"
                )
                renders.append((time.monotonic() - started) * 1000)
            results["first_render_ms"] = {"p50": round(sorted(renders)[LOADS // 2], 1), "max": round(max(renders), 1)}
            frames = await page.evaluate(SCROLL)
            results["scroll_frame_ms"] = {k: round(v, 1) for k, v in frames.items()}

            await page.evaluate(WATCH_STALLED)
            chosen = random.Random(7).sample(list(fleet.views), changes)
            written = []
            started = time.monotonic()
            for n, agent in enumerate(chosen):
                written.append(await fleet.stall(agent))
                await asyncio.sleep(max(0.0, started + (n + 1) / CHANGE_RATE - time.monotonic()))
            await page.wait_for_function(f"window.__stalled.at(-1)?.[1] >= {changes}", timeout=30_000)
            seen: list[list[int]] = await page.evaluate("window.__stalled")
            latencies, i = [], 0
            for k, at in enumerate(written, start=1):  # the first time the count included change k
                while seen[i][1] < k:
                    i += 1
                latencies.append((seen[i][0] - at) / 1000)
            summary = latency_summary(latencies)
            results["update_to_screen_ms"] = {"p50": summary["p50_ms"], "p99": summary["p99_ms"]}
            results["page"] = await page_metrics(page)
            results["page_errors"] = errors
            await browser.close()
        ticks = sorted(server.live.tick_seconds)
        results["server_tick_ms"] = {
            "p50": round(ticks[len(ticks) // 2] * 1000, 1),
            "p99": round(ticks[int(len(ticks) * 0.99)] * 1000, 1),
        }
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await server.stop()
        await fleet.redis.aclose()
    return results


def run(agents: int, changes: int, redis_url: str | None, kafka_bootstrap: str | None) -> dict[str, Any]:
    if not os.path.exists(CHROMIUM):
        raise ConfigError(f"{CHROMIUM} not found: `make bench` installs Debian's chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        raise ConfigError("playwright (the Python package) is not installed: `make bench` installs it") from None
    if changes > agents:
        raise ConfigError(f"--changes ({changes}) cannot exceed --agents ({agents})")
    with workdir() as tmp, contextlib.ExitStack() as stack:
        settings = isolated(base_settings(stack, tmp, redis_url, kafka_bootstrap), "d", stall_timeout=3600.0)
        results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
        results.update(asyncio.run(measure(settings, agents, changes)))
        return results
