"""The query API (HTTP, JSON) over what the processors publish, across all workers' partitions.

- `GET /api/agents?state=S`: current state of every agent (`alive`, `suspect`, `stalled`, `recovered`, `left`)
- `GET /api/agents/{agent_id}`: its state and recent windows
- `GET /api/windows?agent=A&from=T&to=T&size=10s`: window rows; a size that is a multiple of the
  tumbling window (e.g. `60s`) gives hopping windows, merged from the tumbling ones
- `GET /api/events?type=stall&since=T&agent=A&limit=N`: recent `agent-events`
- `GET /api/tasks?state=orphaned`, `GET /api/tasks/{task_id}`: the task registry (owner, epoch, history)
- `GET /api/alerts`: the alerts Alertmanager has firing and the notifications it sent us;
  `POST /api/alertmanager/webhook`: the receiver of those notifications
- `GET /healthz`, `GET /metrics`

Times (`from`, `to`, `since`) are epoch milliseconds or a duration ago (`5m`). Liveness comes from the
detector's published view, the freshest beat from the ingest's registry, and phi is computed against
the partition's own clock (watermark), as the detector does. Every error is JSON `{"error": "..."}`: 400
naming the parameter (or the webhook payload's field), 404 for an unknown agent or route, 405 for a method
the route does not take, 413 for a body over aiohttp's 1 MiB. Only a missing file under `/static/` is
aiohttp's empty 404 (its static handler decides when it opens the file, after every middleware).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import health, redis_client
from heartbeat_registry.core.lifecycle import stop_signal
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.shapes import EVENT_TYPES
from heartbeat_registry.core.tasks import TASK_STATES
from heartbeat_registry.core.views import STATES
from sinks.web import dashboard, params
from sinks.web.eventlog import EventLog
from sinks.web.live import Live
from sinks.web.pipeline_health import PipelineHealth
from sinks.web.queries import Query

log = logging.getLogger(__name__)
REQUESTS = Counter("hbreg_query_requests_total", "Query API requests", ["endpoint", "status"])
RECENT_WINDOWS = 30
MAX_WINDOWS = 10_000
Body = dict[str, Any]


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413 for a body too large, 403 for a path outside /static/) in the
    API's JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        REQUESTS.labels("unknown", "404").inc()
        return web.json_response({"error": f"no such route: {request.method} {request.path}"}, status=404)
    except web.HTTPMethodNotAllowed as exc:
        REQUESTS.labels("unknown", "405").inc()
        allowed = ", ".join(sorted(exc.allowed_methods))
        return web.json_response(
            {"error": f"{request.method} is not allowed on {request.path} (allowed: {allowed})"}, status=405
        )
    except web.HTTPClientError as exc:
        REQUESTS.labels("unknown", str(exc.status)).inc()
        reason = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
        return web.json_response({"error": f"{request.method} {request.path}: {reason}"}, status=exc.status)


def not_json(constant: str) -> float:
    """Python's json reads NaN and Infinity; they are not JSON, and what is kept is served again as JSON."""
    raise ValueError(f"{constant} is not JSON")


def build_app(query: Query, events: EventLog, live: Live) -> web.Application:
    async def answer(endpoint: str, handler: Callable[[], Awaitable[Body]]) -> web.Response:
        try:
            status, body = 200, await handler()
        except params.BadRequest as exc:
            status, body = 400, {"error": str(exc)}
        except params.NotFound as exc:
            status, body = 404, {"error": str(exc)}
        REQUESTS.labels(endpoint, str(status)).inc()
        return web.json_response(body, status=status)

    async def list_agents(request: web.Request) -> web.Response:
        async def handler() -> Body:
            return {"agents": await query.agents(params.choice(request, "state", STATES))}

        return await answer("agents", handler)

    async def one_agent(request: web.Request) -> web.Response:
        async def handler() -> Body:
            agent_id = request.match_info["agent_id"]
            found = await query.agent(agent_id)
            if found is None:
                raise params.NotFound(f"agent {agent_id!r} is not known")
            now = now_ms()
            rows = await query.windows(agent_id, now - RECENT_WINDOWS * query.window_ms, now, query.window_ms)
            return {**found, "windows": rows}

        return await answer("agent", handler)

    async def list_windows(request: web.Request) -> web.Response:
        async def handler() -> Body:
            agent_id = request.query.get("agent")
            if not agent_id:
                raise params.BadRequest("agent: required (the agent id whose windows to list)")
            now = now_ms()
            start = params.instant(request, "from", now - 3600_000)
            end = params.instant(request, "to", now)
            if start > end:
                if "from" in request.query:
                    raise params.BadRequest(f"from: must not be after to ({start} > {end})")
                raise params.BadRequest(f"to: must not be before from, by default an hour ago ({end} < {start})")
            retention_ms = int(query.settings.window_retention * 1000)
            start = max(start, now - retention_ms - query.window_ms)  # nothing older is kept
            if (end - start) // query.window_ms > MAX_WINDOWS:
                blamed = "to" if "from" not in request.query else "from"  # the one given
                raise params.BadRequest(f"{blamed}: at most {MAX_WINDOWS} windows per request; narrow from/to")
            size_ms = params.window_size(request, query.window_ms, MAX_WINDOWS)
            if await query.agent(agent_id) is None:
                raise params.NotFound(f"agent {agent_id!r} is not known")
            return {"windows": await query.windows(agent_id, start, end, size_ms)}

        return await answer("windows", handler)

    async def list_events(request: web.Request) -> web.Response:
        async def handler() -> Body:
            kind = params.choice(request, "type", list(EVENT_TYPES.values()))
            since = params.instant(request, "since", 0)
            limit = params.count(request, "limit", 1000)
            return {"events": events.select(kind, since, request.query.get("agent"), limit)}

        return await answer("events", handler)

    async def list_tasks(request: web.Request) -> web.Response:
        async def handler() -> Body:
            state = params.choice(request, "state", TASK_STATES)
            return {"tasks": await query.tasks(state, params.count(request, "limit", 1000))}

        return await answer("tasks", handler)

    async def one_task(request: web.Request) -> web.Response:
        async def handler() -> Body:
            task_id = request.match_info["task_id"]
            found = await query.task(task_id)
            if found is None:
                raise params.NotFound(f"task {task_id!r} is not known (no agent reports it, nothing happened to it)")
            return found

        return await answer("task", handler)

    async def alertmanager_webhook(request: web.Request) -> web.Response:
        """Alertmanager's webhook receiver: the notifications it actually sent (after grouping, inhibition
        and silences), kept for `hbreg alerts` and the dashboard."""

        async def handler() -> Body:
            raw = await request.read()  # JSON's encoding is its own (RFC 8259): a charset parameter is not read
            try:
                body = json.loads(raw, parse_constant=not_json)
            except ValueError as exc:
                raise params.BadRequest(f"body: expected Alertmanager's webhook JSON ({exc})") from None
            except RecursionError:
                raise params.BadRequest("body: expected Alertmanager's webhook JSON (nested too deeply)") from None
            await query.record_notification(params.notification(body))
            return {"ok": True}

        return await answer("alertmanager_webhook", handler)

    async def list_alerts(request: web.Request) -> web.Response:
        async def handler() -> Body:
            limit = params.count(request, "limit", 100)
            return {"firing": await query.firing_alerts(), "notifications": await query.notifications(limit)}

        return await answer("alerts", handler)

    async def healthz(_: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(query.redis.ping(), 1.0)
            ok = events.running
        except Exception:
            ok = False
        return web.json_response({"ok": ok, "events_reader": events.running}, status=200 if ok else 503)

    app = web.Application(middlewares=[*dashboard.middlewares(query.settings), json_errors])  # type: ignore[list-item]
    app.router.add_get("/api/agents", list_agents)
    app.router.add_get("/api/agents/{agent_id}", one_agent)
    app.router.add_get("/api/windows", list_windows)
    app.router.add_get("/api/events", list_events)
    app.router.add_get("/api/tasks", list_tasks)
    app.router.add_get("/api/tasks/{task_id}", one_task)
    app.router.add_get("/api/alerts", list_alerts)
    app.router.add_post("/api/alertmanager/webhook", alertmanager_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", health.metrics_response)
    dashboard.add_routes(app, query, live)
    return app


class QueryServer:
    """The query API's parts, started and stopped in order (tests run it in-process)."""

    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url", "kafka_bootstrap")
        assert settings.redis_url is not None and settings.kafka_bootstrap is not None
        dashboard.check_auth_setting(settings)
        self.settings = settings
        self.redis = redis_client.connect(settings, socket_timeout=5.0)
        self.query = Query(settings, self.redis)
        self.events = EventLog(settings.kafka_bootstrap, Names.of(settings).events_topic)
        self.live = Live(self.query, self.events, PipelineHealth(settings))
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.events.run(), name="events-reader"),
            asyncio.create_task(self.live.run(), name="live-updates"),
        ]
        self._runner = web.AppRunner(build_app(self.query, self.events, self.live), access_log=None)
        await self._runner.setup()
        host, _, port = self.settings.http_addr.rpartition(":")
        # replicas of the query API may share the port (`hbreg up --replicas query=2`)
        await web.TCPSite(self._runner, host, int(port), reuse_port=True).start()

    async def stop(self) -> None:
        self.live.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        await self.redis.aclose()


async def serve(settings: Settings) -> None:
    stop = stop_signal()
    server = QueryServer(settings)
    await server.start()
    log.info("query API listening", extra={"http_addr": settings.http_addr})
    await stop.wait()
    await server.stop()
    log.info("query API stopped")
