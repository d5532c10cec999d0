"""The state file `hbreg up` writes: `$HBREG_STATE_DIR/state.json`.

It records where the running system listens, so a second terminal's `hbreg events` or `hbreg send`
finds it without any variable set. Keys: `pid`, `started_at_ms`, `broker` (`kafka` or `tansu`),
`redis_url`, `kafka_bootstrap`, `grpc_addr`, `http_addr`, `auth_secret_file`, `processes` (name -> pid).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

FILENAME = "state.json"


def path(state_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(state_dir) / FILENAME


def read(state_dir: pathlib.Path) -> dict[str, Any] | None:
    """The recorded state, or None when no `hbreg up` is running (a stale file is ignored)."""
    try:
        data = json.loads(path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    pid = data.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return data


def write(state_dir: pathlib.Path, data: dict[str, Any]) -> None:
    target = path(state_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, target)


def remove(state_dir: pathlib.Path) -> None:
    path(state_dir).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
