"""HBREG_HTTP_AUTH: the query API and dashboard behind credentials, refused beyond localhost without them,
and the parts that call it (the CLI, Alertmanager's webhook) sending them."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg import api, services
from sinks.web.dashboard import check_auth_setting
from sinks.web.server import QueryServer
from tests.conftest import require_binary

pytestmark = pytest.mark.kafka
AUTH = "ops:s3cr:et"  # a password may hold a colon


def status(url: str, authorization: str | None = None) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


async def test_credentials_are_required_and_accepted(settings: Settings, kafka_bootstrap: str) -> None:
    settings = dataclasses.replace(settings, kafka_bootstrap=kafka_bootstrap, http_auth=AUTH)
    server = QueryServer(settings)
    await server.start()
    base = f"http://{settings.http_addr}"
    basic = "Basic " + base64.b64encode(AUTH.encode()).decode()
    try:
        for path in ("/", "/agents/a-1", "/api/agents", "/api/stream", "/static/main.js"):
            code, headers = await asyncio.to_thread(status, base + path)
            assert code == 401, path
            assert headers["WWW-Authenticate"].startswith("Basic ")
            assert "default-src 'self'" in headers["Content-Security-Policy"]  # errors carry the headers too
        assert (await asyncio.to_thread(status, base + "/api/agents", basic))[0] == 200
        assert (await asyncio.to_thread(status, base + "/api/agents", "Bearer s3cr:et"))[0] == 200
        assert (await asyncio.to_thread(status, base + "/api/agents", "Bearer wrong"))[0] == 401
        assert (await asyncio.to_thread(status, base + "/api/agents", "Basic " + "b3BzOndyb25n"))[0] == 401
        assert (await asyncio.to_thread(status, base + "/healthz"))[0] in (200, 503)  # probes need no secret
        assert (await asyncio.to_thread(status, base + "/metrics"))[0] == 200
        assert "agents" in await asyncio.to_thread(api.get, settings, "/api/agents")  # the CLI sends them
        page = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(urllib.request.Request(base + "/", headers={"Authorization": basic}), timeout=5)
                .read()
                .decode()
            )
        )
        assert "s3cr" not in page  # no secret reaches the page
        with pytest.raises(ConfigError, match="401|credentials"):
            await asyncio.to_thread(api.get, dataclasses.replace(settings, http_auth="ops:wrong"), "/api/agents")
    finally:
        await server.stop()


def test_beyond_localhost_credentials_are_not_optional(settings: Settings) -> None:
    for addr in ("0.0.0.0:8080", "192.0.2.7:8080", "[::]:8080", "example.org:8080"):
        with pytest.raises(ConfigError, match="HBREG_HTTP_AUTH"):
            check_auth_setting(dataclasses.replace(settings, http_addr=addr))
    with pytest.raises(ConfigError, match="USER:PASSWORD"):
        check_auth_setting(dataclasses.replace(settings, http_addr="0.0.0.0:8080", http_auth="no-colon"))
    for addr in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080"):
        check_auth_setting(dataclasses.replace(settings, http_addr=addr))  # the laptop default needs none
    check_auth_setting(dataclasses.replace(settings, http_addr="0.0.0.0:8080", http_auth=AUTH))


def test_the_cli_refuses_to_serve_beyond_localhost_without_credentials(settings: Settings, tmp_path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HBREG_HTTP_ADDR": "0.0.0.0:1",
        "HBREG_REDIS_URL": "redis://127.0.0.1:1",
        "HBREG_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "HBREG_STATE_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "heartbeat_registry", "query"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "HBREG_HTTP_AUTH" in done.stderr, done.stderr


def test_alertmanagers_webhook_carries_the_credentials(tmp_path) -> None:
    require_binary(shutil.which("amtool") is not None, "amtool (Debian's prometheus-alertmanager; make install)")
    require_binary(services.alertmanager_binary() is not None, "prometheus-alertmanager (make install)")
    services.alertmanager_command(9093, tmp_path, "0.0.0.0:8080", 'ops:p"w: d')
    config = tmp_path / "alertmanager.yml"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    checked = subprocess.run(["amtool", "check-config", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (
        'username: "ops"' in config.read_text() and "http://0.0.0.0:8080/api/alertmanager/webhook" in config.read_text()
    )
