"""`/healthz` and `/metrics` for the processes that have no HTTP server of their own (ingest, bridge,
sinks): what a supervisor polls and Prometheus scrapes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


async def metrics_response(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(
    addr: str,
    healthy: Callable[[], bool],
    *,
    registry: CollectorRegistry | None = None,
    details: Callable[[], dict[str, Any]] | None = None,
) -> Callable[[], Awaitable[None]]:
    """Serve `/healthz` (200 or 503) and `/metrics` on `addr`; returns the async cleanup. `registry`: the
    metrics to serve instead of this process's own (a parent merging its children's); `details`: more
    fields for the `/healthz` body."""

    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.json_response({"ok": ok, **(details() if details else {})}, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        if registry is None:
            return await metrics_response(request)
        body = await asyncio.to_thread(generate_latest, registry)  # reads the children's files
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = addr.rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()
    return runner.cleanup
