"""How every long-running process starts and stops: logs first, the loop it runs on, and SIGTERM or
Ctrl-C as a request to drain, flush and commit rather than an abrupt end."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from heartbeat_registry.core.logs import setup_logging
from heartbeat_registry.core.settings import Settings


def install_uvloop() -> None:
    """uvloop where available: it roughly halves the event loop's cost per Redis reply and Kafka batch.
    Not for the ingest: grpc.aio then polls from a thread of its own, measured 20% slower there."""
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


def run(proc: str, settings: Settings, main: Callable[[Settings], Coroutine[Any, Any, object]], *, uvloop: bool) -> int:
    """Run one service's `main(settings)` to its end, with its logs and loop set up."""
    setup_logging(proc, settings.log_level)
    if uvloop:
        install_uvloop()
    asyncio.run(main(settings))
    return 0


def silence_stdout() -> None:
    """Point stdout at /dev/null (its reader is gone), so later writes and the interpreter's flush at
    exit cannot fail."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def exit_on_sigterm() -> None:
    """For synchronous tools (the benchmarks): SIGTERM unwinds the stack like Ctrl-C, so the services
    they started are stopped by their context managers instead of being orphaned."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def die_with_parent() -> None:
    """For a child process, before exec: the kernel sends it SIGTERM when its parent dies, so a
    supervisor killed with SIGKILL leaves nothing behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
