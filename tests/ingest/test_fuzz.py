"""Property-based: arbitrary bytes and arbitrary field values at every RPC of a real ingest process.
The server never crashes, always answers with a status, and never stores an invalid heartbeat."""

from __future__ import annotations

import dataclasses
import math
import time

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tokens import mint
from heartbeat_registry.hbreg import services
from heartbeat_registry.pb import hb
from ingest import validate
from tests import procs

SECRET = "fuzz-secret-0123456789-0123456789-abcdef"
METHODS = ("Beat", "BeatBatch", "BeatStream")
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


@pytest.fixture(scope="module")
def fuzz_target(valkey_url: str, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    from tests.conftest import make_settings

    s = dataclasses.replace(
        make_settings(tmp, "fuzz" + str(int(time.time())), redis_url=valkey_url), auth=True, auth_secret=SECRET
    )
    proc = procs.hbreg(["ingest"], s, tmp / "ingest.log")
    services.wait_port("127.0.0.1", int(s.grpc_addr.rpartition(":")[2]), 20, "ingest")
    channel = grpc.insecure_channel(s.grpc_addr)
    token = mint(SECRET.encode(), "fuzzer", 3600, relay_for=("*",))
    yield s, proc, channel, (("authorization", f"Bearer {token}"),)
    channel.close()
    code = procs.stop(proc)
    assert code == 0, "the ingest did not shut down cleanly after the fuzzing"


def raw(channel: grpc.Channel, method: str):
    path = f"/heartbeat.v1.HeartbeatService/{method}"
    if method == "BeatStream":
        return channel.stream_stream(path, request_serializer=None, response_deserializer=None)
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)


def call(channel: grpc.Channel, method: str, payload: bytes, metadata) -> grpc.StatusCode:
    stub = raw(channel, method)
    try:
        if method == "BeatStream":
            list(stub(iter([payload]), metadata=metadata, timeout=5))
        else:
            stub(payload, metadata=metadata, timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def assert_only_valid_stored(s: Settings) -> None:
    client = redis.Redis.from_url(s.redis_url)
    for stream in Names.of(s).streams():
        for _, fields in client.xrange(stream):
            cols = hb.HeartbeatColumns.FromString(fields[b"b"])
            for i in range(len(cols.agent_id)):
                beat = hb.Heartbeat(
                    agent_id=cols.agent_id[i],
                    task_id=cols.task_id[i],
                    status=cols.status[i],
                    timestamp=cols.timestamp[i],
                    cpu_util=cols.cpu_util[i],
                )
                if not math.isnan(cols.progress[i]):
                    beat.progress = cols.progress[i]
                validate.check(beat)  # raises for anything invalid that got stored
    client.close()


FUZZ = hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=2048))
def test_arbitrary_bytes(fuzz_target, method: str, payload: bytes) -> None:
    s, proc, channel, metadata = fuzz_target
    code = call(channel, method, payload, metadata)
    assert code in EXPECTED, code
    assert proc.poll() is None, "the ingest crashed"


text = st.text(st.characters(codec="utf-8"), max_size=150)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
heartbeats = st.builds(
    lambda agent, task, status, ts, cpu, progress: hb.Heartbeat(
        agent_id=agent,
        task_id=task,
        status=status,
        timestamp=ts,
        cpu_util=cpu,
        **({} if progress is None else {"progress": progress}),
    ),
    st.one_of(text, st.sampled_from(["agent-1", "a.b:c@d/e-f", ""])),
    st.one_of(text, st.just("task-1")),
    st.integers(-5, 10),
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.just(int(time.time() * 1000))),
    floats,
    st.one_of(st.none(), floats),
)


@FUZZ
@given(
    method=st.sampled_from(METHODS),
    beats=st.lists(heartbeats, min_size=0, max_size=5),
    auth=st.one_of(st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200)),
)
def test_arbitrary_field_values(fuzz_target, method: str, beats: list, auth) -> None:
    s, proc, channel, metadata = fuzz_target
    if auth is not None:  # any legal header value (grpc itself refuses to send control characters)
        metadata = (("authorization", auth),)
    if method == "BeatBatch":
        payload = hb.BeatBatchRequest(heartbeats=beats).SerializeToString()
    else:
        payload = (beats[0] if beats else hb.Heartbeat()).SerializeToString()
    code = call(channel, method, payload, metadata)
    assert code in EXPECTED, code
    assert proc.poll() is None, "the ingest crashed"
    if code == grpc.StatusCode.OK:
        for beat in beats[: None if method == "BeatBatch" else 1]:
            validate.check(beat)
    assert_only_valid_stored(s)
