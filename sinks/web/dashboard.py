"""The Monitor Dashboard's side of the HTTP server: the page (`/`, `/agents/{id}`, `/tasks/{id}`, all the
same page, which routes in the browser), its committed assets (`/static/`, no build step, nothing from a
CDN), the live stream (`/api/stream`, Server-Sent Events, sinks/web/live.py) and the CPU sparklines of
the rows in view (`/api/sparklines`), and the latest `hbreg tune` report (`/reports/tune`, kept in Redis by
the tuner; the one page with inline scripts, allowed by their hashes alone).

Read-only: nothing on the page changes the system. Beyond localhost the whole HTTP side wants credentials
(HBREG_HTTP_AUTH: Basic `USER:PASSWORD`, which browsers handle themselves, or the password as a Bearer
token for API clients); no secret is ever sent to the page. Every answer carries security headers; the
CSP allows no inline script or style and no other origin.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import pathlib
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.relay import on_loopback
from sinks.web import params
from sinks.web.live import Live
from sinks.web.queries import Query

STATIC = pathlib.Path(__file__).resolve().parent / "static"
SPARKLINE_WINDOWS = 12
MAX_SPARKLINES = 200
KEEPALIVE_S = 15.0
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def check_auth_setting(settings: Settings) -> None:
    """Beyond localhost, credentials are not optional."""
    if settings.http_auth is None and not on_loopback(settings.http_addr):
        raise ConfigError(
            f"HBREG_HTTP_ADDR={settings.http_addr} is reachable beyond localhost: set HBREG_HTTP_AUTH=USER:PASSWORD"
        )
    if settings.http_auth is not None and ":" not in settings.http_auth:
        raise ConfigError("HBREG_HTTP_AUTH: expected USER:PASSWORD")


def inline_hashes(page: str, tag: str) -> list[str]:
    """CSP sources allowing exactly the page's inline `<tag>` bodies (a report is one self-contained page)."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
    return ["'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in bodies]


def middlewares(settings: Settings) -> list[Middleware]:
    user, _, password = (settings.http_auth or "").partition(":")
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()

    @web.middleware
    async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
        if settings.http_auth is not None and request.path not in ("/healthz", "/metrics"):
            given = request.headers.get("Authorization", "")
            ok = hmac.compare_digest(given, f"Basic {basic}") or hmac.compare_digest(given, f"Bearer {password}")
            if not ok:
                return web.json_response(
                    {"error": "credentials required (HBREG_HTTP_AUTH)"},
                    status=401,
                    headers={"WWW-Authenticate": 'Basic realm="hbreg", charset="UTF-8"'},
                )
        return await handler(request)

    return [headers, credentials]


def add_routes(app: web.Application, query: Query, live: Live) -> None:
    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        queue = live.subscribe()
        try:
            await response.write(b"retry: 1000\n\n" + live.snapshot())  # reconnect after 1 s when lost
            while True:
                try:  # asyncio.timeout: wait_for on Python 3.11 can swallow the server's cancel
                    async with asyncio.timeout(KEEPALIVE_S):
                        message = await queue.get()
                except TimeoutError:
                    message = b": keepalive\n\n"
                if not message:  # dropped for reading too slowly: the page reconnects
                    break
                await response.write(message)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            live.unsubscribe(queue)
        return response

    async def sparklines(request: web.Request) -> web.Response:
        agents = [a for a in request.query.get("agents", "").split(",") if a][:MAX_SPARKLINES]
        if not agents:
            return web.json_response({"error": "agents: required (comma-separated agent ids)"}, status=400)
        try:
            count = params.count(request, "windows", SPARKLINE_WINDOWS) or SPARKLINE_WINDOWS
        except params.BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"sparklines": await query.cpu_trends(agents, min(count, 60))})

    async def tune_report(_: web.Request) -> web.Response:
        report = await query.redis.get(query.names.tune_report)
        if report is None:
            return web.json_response({"error": "no tuning report yet: run `hbreg tune`"}, status=404)
        text = report.decode() if isinstance(report, bytes) else report
        scripts = " ".join(inline_hashes(text, "script"))
        styles = " ".join(inline_hashes(text, "style"))
        csp = f"default-src 'none'; script-src {scripts}; style-src {styles}; img-src data:; frame-ancestors 'none'"
        return web.Response(text=text, content_type="text/html", headers={"Content-Security-Policy": csp})

    app.router.add_get("/reports/tune", tune_report)
    app.router.add_get("/", page)
    app.router.add_get("/agents/{agent_id}", page)
    app.router.add_get("/tasks/{task_id}", page)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.router.add_get("/api/stream", stream)
    app.router.add_get("/api/sparklines", sparklines)
