"""`hbreg service valkey|kafka`: the embedded services as Procfile processes.

The process replaces itself with the real binary (exec), so `hbreg up` signals the service directly.
Ports come from HBREG_REDIS_URL / HBREG_KAFKA_BOOTSTRAP, data goes under the run directory.
"""

from __future__ import annotations

import os
import pathlib

from heartbeat_registry import embedded
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.settings import Settings


def _port(value: str | None, var: str) -> int:
    if not value:
        raise ConfigError(f"{var} must be set for an embedded service")
    tail = value.split(",")[0].rstrip("/").rpartition(":")[2]
    return int(tail)


def run(service: str, settings: Settings) -> int:
    run_dir = pathlib.Path(os.environ.get("HBREG_RUN_DIR") or settings.state_dir / "run")
    if service == "valkey":
        port = _port(settings.redis_url, "HBREG_REDIS_URL")
        # durable: the append-only file lives beside the state file and survives restarts of `hbreg up`
        data = settings.state_dir / "valkey" if settings.redis_durable else run_dir / "valkey"
        cmd = embedded.valkey_command(port, data, durable=settings.redis_durable)
    else:
        port = _port(settings.kafka_bootstrap, "HBREG_KAFKA_BOOTSTRAP")
        if embedded.broker_kind() == "kafka":
            cmd = embedded.kafka_command(port, run_dir / "kafka")
        else:  # `hbreg up` already said why, in one line
            cmd = embedded.tansu_command(port)
    embedded.exec_service(cmd)
    return 0  # not reached
