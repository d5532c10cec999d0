"""Child processes of the tests: started in their own process group, always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig) if _own_group(proc) else proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def hbreg(args: Sequence[str], settings: Settings, log_path, **env: str) -> subprocess.Popen:
    """Run `hbreg ARGS` with `settings` as its environment, output to `log_path`."""
    child_env = {**os.environ, **settings.child_env(), "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "heartbeat_registry", *args],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def valkey(port: int, data) -> subprocess.Popen:
    """A Valkey of a test's own (durable: append-only file), for tests that kill and restart it."""
    proc = subprocess.Popen(
        services.valkey_command(port, data, durable=True), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    services.wait_port("127.0.0.1", port, 15, "valkey")
    return proc
