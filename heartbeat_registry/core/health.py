"""`/healthz` and `/metrics` for the processes that have no HTTP server of their own (ingest, bridge,
sinks): what a supervisor polls and Prometheus scrapes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


async def metrics_response(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(addr: str, healthy: Callable[[], bool]) -> Callable[[], Awaitable[None]]:
    """Serve `/healthz` (200 or 503) and `/metrics` on `addr`; returns the async cleanup."""

    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_response)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = addr.rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()
    return runner.cleanup
