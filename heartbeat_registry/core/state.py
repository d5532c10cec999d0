"""What `hbreg up` keeps in `$HBREG_STATE_DIR`: the state file `state.json` and the signing secret.

The state file records where the running system listens, so a second terminal's `hbreg events` or
`hbreg send` finds it without any variable set (the settings read it). Keys: `pid`, `started_at_ms`,
`broker` (`kafka` or `tansu`), `redis_url`, `kafka_bootstrap`, `grpc_addr`, `http_addr`,
`alertmanager_url`, `auth_secret_file`, `processes` (name -> pid). The secret file `auth_secret` outlives
a run, so tokens minted for the embedded system stay valid across restarts.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
from typing import Any

FILENAME = "state.json"
SECRET_FILENAME = "auth_secret"


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


def secret_path(state_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(state_dir) / SECRET_FILENAME


def ensure_secret(state_dir: pathlib.Path) -> pathlib.Path:
    """The signing secret `hbreg up` keeps in its state directory, made once with mode 600."""
    path = secret_path(state_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path
