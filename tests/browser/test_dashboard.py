"""The Monitor Dashboard in a real browser (Debian's Chromium), over the real pipeline: ingest (in-process),
Valkey, bridge, Kafka, worker and reassignment sink (processes), the query API serving the page."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request

import pytest
import redis.asyncio as aioredis

from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg.bench.dashboard import SCROLL, FakeFleet
from heartbeat_registry.hbreg.simulate import Fleet
from heartbeat_registry.hbreg.tune import report
from sinks.web.server import QueryServer
from tests import procs
from tests.browser.conftest import Page
from tests.processors.conftest import running_pipeline
from tests.sinks.conftest import start_sink

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def row(page: Page, agent: str):  # noqa: ANN201 - a Playwright locator
    return page.page.locator("#fleet-body .row", has=page.page.locator(f"a:text-is('{agent}')"))


async def state_of(page: Page, agent: str) -> str:
    found = row(page, agent)
    if await found.count() == 0:
        return ""
    return (await found.locator(".state").inner_text()).split(" ")[0]


async def wait_for(check, timeout: float, every: float = 0.05) -> float:  # noqa: ANN001
    """Seconds until `check()` (async) is true; fails after `timeout`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "not in time"
        await asyncio.sleep(every)
    return time.monotonic() - started


async def test_the_fleet_live_in_a_browser(pipeline_settings: Settings, tmp_path, page: Page) -> None:
    settings = dataclasses.replace(pipeline_settings, stall_timeout=2.0)
    async with running_pipeline(settings, tmp_path, query=True) as pipeline:
        sink = await start_sink(settings, tmp_path / "reassign.log")
        agents = [f"web-{i:03d}" for i in range(200)]
        fleet = Fleet(settings.grpc_addr, agents, interval=0.5, jitter=0.2)
        try:
            await fleet.start()
            await asyncio.sleep(4)
            url = f"http://{settings.http_addr}"
            headers = await asyncio.to_thread(response_headers, url + "/")  # the page's own security headers
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert "unsafe-inline" not in headers["Content-Security-Policy"]
            assert headers["X-Frame-Options"] == "DENY"
            await page.page.goto(url + "/")
            await wait_for(lambda: page.page.locator("#fleet-body .row").count(), 5)
            alive = page.page.locator("#counts .s-alive b")
            await wait_for(lambda: _text_is(alive, "200"), 10)
            assert await page.page.locator("#fleet-body .row").count() < 60, "rendered more rows than are in view"

            # an agent killed now turns stalled on the page without a reload, within the timeout + 1 s
            victim = "web-150"
            await fleet.kill(victim)
            killed = time.monotonic()
            await wait_for(lambda: _state_is(page, victim, "stalled"), settings.stall_timeout + 5)
            took = time.monotonic() - killed
            assert took <= settings.stall_timeout + 0.5 + 1.0, f"stalled on screen {took:.2f} s after the kill"
            reassigned = page.page.locator("#events li", has_text=f"reassigned: {victim}-task")
            await wait_for(lambda: reassigned.count(), 5)
            await page.page.fill("#text-filter", "")
            await page.page.mouse.move(0, 0)  # off the table: the order follows the data
            await wait_for(lambda: _text_is(page.page.locator("#fleet-body .row a").first, victim), 3)  # problems first
            await page.screenshot("fleet-200-agents.png")
            await fleet.revive(victim)
            await wait_for(lambda: _state_in(page, victim, ("recovered", "alive")), 10)

            # filter, find, sort, then an agent page and a task page, with clicks
            await page.page.select_option("#state-filter", "problems")
            await page.page.fill("#text-filter", "web-15")
            shown = await page.page.locator("#fleet-body .row .state").all_inner_texts()
            assert all(s.split(" ")[0] in ("stalled", "suspect", "recovered") for s in shown)
            await page.page.select_option("#state-filter", "")
            await page.page.fill("#text-filter", "web-01")
            await wait_for(lambda: _count_is(page.page.locator("#fleet-body .row"), 10), 3)
            await page.page.click("button[aria-label='sort by Agent']")
            await page.page.click("button[aria-label='sort by Agent']")  # descending
            first = await page.page.locator("#fleet-body .row a").first.inner_text()
            assert first == "web-019", first
            await page.page.click("#fleet-body a:text-is('web-015')")
            await page.page.wait_for_url("**/agents/web-015")
            await page.page.locator("#agent-cpu canvas").first.wait_for()
            assert await page.page.locator("h2", has_text="Agent web-015").count() == 1
            await page.screenshot("agent-page.png")
            assert await page.accessibility_violations() == []
            await page.page.click("a:text-is('web-015-task')")
            await page.page.wait_for_url("**/tasks/web-015-task")
            await page.page.locator("#task-view table.plain tr td").first.wait_for()
            assert await page.accessibility_violations() == []
            await page.page.go_back()
            await page.page.go_back()
            await page.page.fill("#text-filter", "")
            assert await page.accessibility_violations() == []

            # the server goes away: a banner; it comes back: live again without a reload
            await pipeline.query.stop()
            await wait_for(lambda: page.page.locator("#banner").is_visible(), 5)
            pipeline.query = QueryServer(settings)
            await pipeline.query.start()
            await wait_for(lambda: page.page.locator("#banner").is_hidden(), 10)
            await fleet.kill("web-160")
            await wait_for(lambda: _state_is(page, "web-160", "stalled"), settings.stall_timeout + 5)
        finally:
            await fleet.stop()
            procs.stop(sink)
    unexpected = [e for e in page.errors if "api/stream" not in e and "ERR_CONNECTION_REFUSED" not in e]
    assert unexpected == [], unexpected  # the stream's own errors while the server was away are expected


def response_headers(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(response.headers)


async def _text_is(locator, text: str) -> bool:  # noqa: ANN001
    return (await locator.inner_text()) == text


async def _count_is(locator, count: int) -> bool:  # noqa: ANN001
    return await locator.count() == count


async def _state_is(page: Page, agent: str, state: str) -> bool:
    await page.page.fill("#text-filter", agent)
    return await state_of(page, agent) == state


async def _state_in(page: Page, agent: str, states: tuple[str, ...]) -> bool:
    await page.page.fill("#text-filter", agent)
    return await state_of(page, agent) in states


async def test_ten_thousand_agents_render_in_under_2_s_and_scroll_smoothly(
    settings: Settings, kafka_bootstrap: str, page: Page
) -> None:
    settings = dataclasses.replace(settings, kafka_bootstrap=kafka_bootstrap, stall_timeout=600.0)
    fleet = FakeFleet(settings, 10_000)
    await fleet.write(list(fleet.views))
    server = QueryServer(settings)
    await server.start()
    try:
        await asyncio.sleep(1.0)  # the broadcaster's first read
        started = time.monotonic()
        await page.page.goto(f"http://{settings.http_addr}/")
        await page.page.wait_for_function("document.getElementById('fleet-count').textContent.startsWith('10000 of')")
        first_render = time.monotonic() - started
        assert first_render < 2.0, f"first render took {first_render:.2f} s"
        assert await page.page.locator("#fleet-body .row").count() < 60
        frames = await asyncio.wait_for(page.page.evaluate(SCROLL), 30)
        # 60 frames a second as a rule; on two busy cores (the broker warming up beside us) the odd frame is slow
        assert frames["p50"] < 25 and frames["p95"] < 100, f"scrolling frame times {frames}"
        assert await page.page.locator("#fleet-body .row").count() < 60
    finally:
        await server.stop()
        await fleet.redis.aclose()
    assert page.errors == [], page.errors


async def test_the_tuning_report_renders_under_its_own_csp(settings: Settings, kafka_bootstrap: str, browser) -> None:  # noqa: ANN001
    settings = dataclasses.replace(settings, kafka_bootstrap=kafka_bootstrap)
    sets = [({"stall_timeout": t}, f, 20, t * 1000 + 50) for t, f in ((2.0, 20), (4.0, 0), (3.0, 4))]
    results = [
        {"params": p, "stalls": f + t, "false_stalls": f, "true_stalls": t, "unlabelled": 0, "unresolved": t,
         "delay_p50_ms": d - 40, "delay_p99_ms": d, "by_reason": {"silent": f + t}, "live": p["stall_timeout"] == 2.0}
        for p, f, t, d in sets
    ]  # fmt: skip
    result = {
        "heartbeats": 4880,
        "agents": 100,
        "period": {"from_ms": 1, "to_ms": 2, "warmup_s": 300.0, "source": "kafka"},
        "live": results[0] | {"matches_live_events": True, "differences": [], "live_events": 40},
        "results": results,
    }
    client = aioredis.Redis.from_url(settings.redis_url)
    await client.set(Names.of(settings).tune_report, report.render(result))
    await client.aclose()
    server = QueryServer(settings)
    await server.start()
    context = await browser.new_context(viewport={"width": 1200, "height": 900})  # the page's CSP enforced
    try:
        page = Page(await context.new_page())
        await page.page.goto(f"http://{settings.http_addr}/reports/tune")
        await page.page.locator("#chart canvas").first.wait_for()
        assert await page.page.locator("table.sets tr").count() == 4
        assert await page.page.locator("tr.live td").first.inner_text() == "live"
        await page.screenshot("tuning-report.png")
        assert page.errors == [], page.errors  # a blocked inline script or style would be an error here
    finally:
        await context.close()
        await server.stop()
