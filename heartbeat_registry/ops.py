"""What every long-running process shares: structured logs, uvloop, SIGTERM handling and the small
HTTP endpoint with `/healthz` and `/metrics` (Prometheus text format).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class LogfmtFormatter(logging.Formatter):
    """One line per record: `ts=... level=... proc=... logger=... msg="..." key=value ...`.

    Extra fields given with `extra={...}` become keys, so logs can be filtered by agent, shard or
    error without parsing prose.
    """

    def __init__(self, proc: str) -> None:
        super().__init__()
        self.proc = proc

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"proc={self.proc}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                text = value if isinstance(value, (int, float)) else json.dumps(str(value))
                parts.append(f"{key}={text}")
        if record.exc_info:
            parts.append(f"exc={json.dumps(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(proc: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(proc))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def install_uvloop() -> None:
    """uvloop where available: it roughly halves the event loop's cost per RPC and per Redis reply."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def stop_signal() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT, so `main` can drain, flush and commit before exiting."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_ops(addr: str, healthy: Callable[[], bool]) -> Callable[[], object]:
    """Serve `/healthz` (200 or 503) and `/metrics`; returns an async cleanup callable."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = addr.rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()
    return runner.cleanup
