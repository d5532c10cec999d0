"""The query API as `hbreg agents` and `hbreg windows` call it: a GET that answers JSON, and every
failure (a refused parameter, an unknown agent, nothing listening) as one clear line."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.errors import ConfigError


def get(settings: Settings, path: str, **params: object) -> dict[str, Any]:
    """GET `path` with the non-None `params`; 4xx answers become a ConfigError with the API's message."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    url = f"http://{settings.http_addr}{path}" + (f"?{query}" if query else "")
    try:
        request = urllib.request.Request(url)
        if settings.http_auth is not None:  # the API asks for it when bound beyond localhost
            token = base64.b64encode(settings.http_auth.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise ConfigError(f"{detail} ({exc.code} from {url})") from None
    except OSError as exc:
        raise ConfigError(f"the query API at {url} is not reachable ({exc}); is `hbreg up` running?") from None
