"""`hbreg` as a user types it, for what needs no running system."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jwt

from heartbeat_registry import __version__
from heartbeat_registry.core import state
from heartbeat_registry.hbreg.cli import build_parser


def hbreg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "heartbeat_registry", *args], capture_output=True, text=True, timeout=60, env=env
    )


def clean_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HBREG_")}
    env["HBREG_STATE_DIR"] = str(tmp_path / "state")
    return env


def test_version() -> None:
    result = hbreg("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"hbreg {__version__}"


def test_help_describes_every_option() -> None:
    """Every option of every command says what it is for."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, command in commands.items()
        for action in command._actions
        if action.option_strings and action.help is None
    ]
    assert silent == []
    events = " ".join(hbreg("events", "--help").stdout.split())
    assert "last day" in events and "exits" in events
    for command in ("agents", "windows", "events", "send", "token", "tasks", "task"):
        assert "--http-addr" in hbreg(command, "--help").stdout


def test_token_with_the_system_stopped_uses_the_kept_secret(tmp_path) -> None:
    """`hbreg up` keeps its signing secret in the state directory; with nothing running (no state
    file) `hbreg token` still mints with it, so the token is valid at the next `hbreg up`."""
    env = clean_env(tmp_path)
    secret_file = state.ensure_secret(tmp_path / "state")
    assert not state.path(tmp_path / "state").exists()
    result = hbreg("token", "agent-1", "--ttl", "1h", env=env)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), secret_file.read_bytes().strip(), algorithms=["HS256"])
    assert claims["sub"] == "agent-1"


def test_token_without_any_secret_says_what_to_do(tmp_path) -> None:
    result = hbreg("token", "agent-1", env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "HBREG_AUTH_SECRET" in result.stderr and "hbreg up" in result.stderr
