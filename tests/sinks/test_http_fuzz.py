"""Property-based: arbitrary query strings, path segments, methods, bodies and content types at every route
of a real query API (in-process, on the session's Valkey and Kafka). Never a 5xx; every 4xx is the API's
JSON `{"error": "..."}` naming what was wrong; the server still answers afterwards."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import redis
from hypothesis import HealthCheck, assume, event, example, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from yarl import URL

from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.shapes import EVENT_TYPES
from heartbeat_registry.core.tasks import TASK_STATES
from heartbeat_registry.core.views import STATES
from heartbeat_registry.hbreg import tables
from heartbeat_registry.pb import hb
from sinks.web import dashboard
from sinks.web.server import QueryServer
from tests.conftest import make_settings
from tests.kafka_helpers import eventually
from tests.sinks.conftest import topics

pytestmark = pytest.mark.kafka

AGENT, TASK = "fz-agent-1", "fz-task-1"
GET_ROUTES = (
    "/api/agents",
    "/api/agents/{}",
    "/api/windows",
    "/api/events",
    "/api/tasks",
    "/api/tasks/{}",
    "/api/alerts",
    "/api/sparklines",
    "/reports/tune",
    "/",
    "/agents/{}",
    "/tasks/{}",
    "/static/{}",
    "/healthz",
    "/metrics",
    "/api/{}",
)  # all but /api/stream, which never ends (Server-Sent Events)
WEBHOOK = "/api/alertmanager/webhook"
ASSETS = {p.read_bytes() for p in dashboard.STATIC.rglob("*") if p.is_file()}
PARAMS = ("state", "agent", "from", "to", "size", "type", "since", "limit", "agents", "windows")
# the methods an HTTP server parses at all (aiohttp's parser refuses other tokens before any route is seen)
METHODS = ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK")
REQUIRED = {"/api/windows": "agent", "/api/sparklines": "agents"}  # named by a 400 when missing
FUZZ = hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclasses.dataclass
class Api:
    base: str
    http: aiohttp.ClientSession

    async def call(
        self, method: str, target: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, str, bytes]:
        """`target` is sent exactly as given (already percent-encoded): (status, content type, body)."""
        headers = {} if content_type is None else {"Content-Type": content_type}
        url = URL(self.base + target, encoded=True)
        async with self.http.request(method, url, data=body, headers=headers, allow_redirects=False) as response:
            return response.status, response.content_type, await response.read()


def seed(settings) -> None:
    """One agent in the ingest's registry, beating RUNNING on a task: the 200 paths have something to read."""
    names = Names.of(settings)
    client = redis.Redis.from_url(settings.redis_url)
    now = int(time.time() * 1000)
    client.hset(names.latest(partition_of(AGENT, names.shards)), AGENT, f"{now} {hb.RUNNING} 500 {now} - {TASK}")
    client.close()


@pytest.fixture(scope="module")
async def api(valkey_url: str, kafka_bootstrap: str, tmp_path_factory) -> AsyncIterator[Api]:
    prefix = "fz" + uuid.uuid4().hex[:8]
    settings = make_settings(
        tmp_path_factory.mktemp("http-fuzz"), prefix, redis_url=valkey_url, kafka_bootstrap=kafka_bootstrap
    )
    seed(settings)
    await topics(settings)  # the events reader waits for agent-events to exist
    server = QueryServer(settings)
    await server.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            target = Api(f"http://{settings.http_addr}", http)

            async def up() -> bool:
                return (await target.call("GET", "/healthz"))[0] == 200

            await eventually(up, 60, every=0.2)  # the events reader caught up with agent-events
            yield target
    finally:
        await server.stop()


def error_of(status: int, content_type: str, raw: bytes) -> str:
    """The error message of a 4xx, which must be the API's JSON shape; never a 5xx."""
    assert status < 500, (status, raw[:500])
    assert content_type == "application/json", (status, content_type, raw[:200])
    body = json.loads(raw)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message.strip(), body
    return message


def named(message: str) -> str:
    """What a 400 names first: `limit` of `limit: ...`, `alerts` of `alerts[2].labels: ...`."""
    return message.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0]


async def still_serving(api: Api) -> None:
    """The positive control after each property: valid requests still get their answer."""
    status, _, raw = await api.call("GET", "/healthz")
    assert status == 200 and json.loads(raw)["ok"] is True
    status, _, raw = await api.call("GET", f"/api/agents/{AGENT}")
    assert status == 200 and json.loads(raw)["agent_id"] == AGENT
    status, _, raw = await api.call("GET", f"/api/tasks/{TASK}")
    assert status == 200 and json.loads(raw)["owner"] == AGENT


def pct(data: bytes) -> str:
    return "".join(f"%{b:02X}" for b in data)


EDGES = [
    "", "-", "--5", "²", "٣", "1_000", " 7 ", "0", "-1", "9" * 5000, str(2**63), str(10**30), "inf", "-inf", "nan",
    "1e308", "1e308d", "0.0001ms", "0s", "1000000h", "5m", "1h", "30s", "10s", "20s", "-5m",
]  # fmt: skip
values = st.one_of(
    st.text(max_size=30),
    st.integers(-(10**25), 10**25).map(str),
    st.sampled_from(EDGES),
    st.builds(
        "{}{}".format,
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["", "ms", "s", "m", "h", "d"]),
    ),
    st.sampled_from([*STATES, *TASK_STATES, *EVENT_TYPES.values(), AGENT, TASK, f"{AGENT},{AGENT}"]),
)
query_strings = st.one_of(
    st.lists(st.tuples(st.one_of(st.sampled_from(PARAMS), st.text(max_size=10)), values), max_size=5).map(
        lambda pairs: "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    ),
    st.binary(max_size=60).map(pct),  # arbitrary bytes, percent-encoded
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(lambda s: quote(s, safe="=&%")),
)
segments = st.one_of(
    st.text(max_size=40).map(lambda s: quote(s, safe="")),
    st.binary(min_size=1, max_size=40).map(pct),
    st.sampled_from([AGENT, TASK, "main.js", "..", "%2e%2e", "%2e%2e%2f%2e%2e%2fpyproject.toml", "a/b", "%00"]),
)


def sent_params(query: str) -> set[str]:
    return {str(k) for k in URL("/?" + query, encoded=True).query}


@FUZZ
@example(route="/api/events", segment="", query="since=%C2%B2")  # '²' is a digit to str.isdigit, not to int
@example(route="/api/events", segment="", query="since=--5")
@example(route="/api/events", segment="", query="since=" + "9" * 5000)
@example(route="/api/tasks", segment="", query=f"limit={10**30}")
@example(route="/api/alerts", segment="", query=f"limit={2**63}")
@example(route="/api/windows", segment="", query=f"agent={AGENT}&size=1000000h")
@example(route="/api/windows", segment="", query=f"agent={AGENT}&size=0.0001ms")
@example(route="/api/windows", segment="", query=f"agent={AGENT}&to=0")
@example(route="/api/windows", segment="", query=f"agent={AGENT}&to={10**20}")
@given(route=st.sampled_from(GET_ROUTES), segment=segments, query=query_strings)
async def test_any_query_string_at_any_get_route(api: Api, route: str, segment: str, query: str) -> None:
    path = route.format(segment)
    assume(path != "/api/stream")
    status, content_type, raw = await api.call("GET", f"{path}?{query}" if query else path)
    event(f"{status}")
    if route == "/static/{}":
        # aiohttp's static handler serves the committed assets and nothing else; a missing file's 404 is
        # decided when the file is opened, after every middleware, so its body is empty (not JSON)
        assert (status == 200 and raw in ASSETS) or status in (403, 404), (status, raw[:200])
    elif status < 400:
        if path.startswith("/api/") or path == "/healthz":
            json.loads(raw, parse_constant=reject_constant)  # strict JSON: no NaN or Infinity
    else:
        message = error_of(status, content_type, raw)
        assert status in (400, 404, 405), (status, message)
        if status == 400:
            assert named(message) in sent_params(query) | {REQUIRED.get(route, "")}, (path, query, message)
        elif status == 404:
            assert "no such route" in message or " is not known" in message or "no tuning report" in message
        else:
            assert "is not allowed" in message, message
    await still_serving(api)


@FUZZ
@given(
    method=st.sampled_from(METHODS),
    route=st.sampled_from([*GET_ROUTES, WEBHOOK, "/api/stream"]),
    segment=segments,
)
async def test_any_method_at_any_route(api: Api, method: str, route: str, segment: str) -> None:
    if method == "POST" and route == WEBHOOK:
        method = "PUT"
    status, content_type, raw = await api.call(method, route.format(segment))
    event(f"{status}")
    message = error_of(status, content_type, raw)
    assert status in (404, 405), (status, message)
    assert ("is not allowed" if status == 405 else "no such route") in message, message
    await still_serving(api)


def reject_constant(name: str) -> float:
    raise ValueError(f"not JSON: {name}")


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
anything = scalars | st.lists(json_values, max_size=3)  # any JSON but an object
labels = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)
text = st.text(max_size=10)
# Alertmanager's webhook payload, each field either of its type or of any other
alert_entries = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["firing", "resolved"]) | anything,
        "labels": labels | anything,
        "annotations": labels | anything,
        "startsAt": text | anything,
        "endsAt": text | anything,
        "generatorURL": text | anything,
        "fingerprint": text | anything,
    },
)
notifications = st.fixed_dictionaries(
    {"alerts": st.lists(alert_entries | anything, max_size=3) | anything},
    optional={
        "version": st.just("4") | anything,
        "status": st.sampled_from(["firing", "resolved"]) | anything,
        "receiver": text | anything,
        "groupLabels": labels | anything,
        "commonLabels": labels | anything,
        "commonAnnotations": labels | anything,
        "externalURL": text | anything,
        "groupKey": text | anything,
        "truncatedAlerts": st.integers(0, 5) | anything,
    },
)
# ... and each of its type, whatever its content
genuine = st.fixed_dictionaries(
    {
        "alerts": st.lists(
            st.fixed_dictionaries({"status": text, "labels": labels, "annotations": labels, "startsAt": text}),
            max_size=3,
        )
    },
    optional={"status": text, "groupLabels": labels, "commonLabels": labels, "truncatedAlerts": st.integers(0, 9)},
)
bodies = st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode()),
    notifications.map(lambda v: json.dumps(v).encode()),
    genuine.map(lambda v: json.dumps(v).encode()),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=utf-16",
            "application/json; charset=no-such-charset",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
        ]
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)


@FUZZ
@example(body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")  # deeper than Python recurses
@example(body=b'{"alerts": [], "status": NaN}', content_type="application/json")  # not JSON, Python reads it
@example(body=b'{"alerts": []}', content_type="application/json; charset=no-such-charset")
@example(body=b'{"alerts": [], "groupLabels": "x"}', content_type="application/json")
@example(body=b'{"alerts": [], "status": ["firing"]}', content_type="application/json")
@example(body=b'{"alerts": [7]}', content_type="application/json")
@example(body=b"x" * (2 * 1024 * 1024), content_type="application/json")  # beyond the body size allowed
@given(body=bodies, content_type=content_types)
async def test_any_body_and_content_type_at_the_webhook(api: Api, body: bytes, content_type: str | None) -> None:
    """Whatever the receiver accepts, its readers can show (the API's strict JSON, and `hbreg alerts`);
    whatever it refuses, it does not keep."""
    before = await newest_notification(api)
    status, answer_type, raw = await api.call("POST", WEBHOOK, body, content_type)
    event(f"{status}")
    if status == 200:
        assert json.loads(raw) == {"ok": True}
        status, _, raw = await api.call("GET", "/api/alerts?limit=1")
        assert status == 200
        found = json.loads(raw, parse_constant=reject_constant)
        kept = found["notifications"][0]
        assert {k: v for k, v in json.loads(body).items() if k != "received_ms"} == without_received(kept)
        tables.alerts(found)  # what `hbreg alerts` prints
    else:
        message = error_of(status, answer_type, raw)
        assert status in (400, 413), (status, message)
        if status == 400:
            sent = json.loads(body) if is_json(body) else None
            fields = set(sent) if isinstance(sent, dict) else set()
            assert named(message) in {"body", "alerts"} | fields, message
        assert await newest_notification(api) == before, "a refused notification was kept"
    await still_serving(api)


async def newest_notification(api: Api) -> dict[str, Any] | None:
    status, _, raw = await api.call("GET", "/api/alerts?limit=1")
    assert status == 200
    notes = json.loads(raw, parse_constant=reject_constant)["notifications"]
    return notes[0] if notes else None


def without_received(note: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in note.items() if k != "received_ms"}


def is_json(body: bytes) -> bool:
    try:
        json.loads(body, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        return False
    return True


async def test_a_genuine_notification_is_kept_and_served(api: Api) -> None:
    """The positive control of the webhook property: Alertmanager's own payload is accepted as sent."""
    payload: dict[str, Any] = {
        "version": "4",
        "groupKey": '{}:{alertname="AgentStalled"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "hbreg-webhook",
        "groupLabels": {"alertname": "AgentStalled"},
        "commonLabels": {"alertname": "AgentStalled", "severity": "critical"},
        "commonAnnotations": {},
        "externalURL": "http://127.0.0.1:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "AgentStalled", "agent_id": AGENT},
                "annotations": {"summary": "stalled"},
                "startsAt": "2026-01-01T00:00:00.000Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://example/agents/fz-agent-1",
                "fingerprint": "0123456789abcdef",
            }
        ],
    }
    status, _, raw = await api.call("POST", WEBHOOK, json.dumps(payload).encode(), "application/json")
    assert (status, json.loads(raw)) == (200, {"ok": True})
    status, _, raw = await api.call("GET", "/api/alerts?limit=1")
    note = json.loads(raw)["notifications"][0]
    assert status == 200 and without_received(note) == payload
    assert isinstance(note["received_ms"], int)
    assert "AgentStalled" in tables.alerts(json.loads(raw))
    await still_serving(api)
