"""Per-agent credentials against the real ingest and Valkey: tokens, relay tokens, TLS and mutual TLS."""

from __future__ import annotations

import dataclasses
import time

import grpc
import pytest

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tokens import mint
from heartbeat_registry.pb import hb, hb_grpc
from ingest.server import Ingest
from tests.certs import CA

SECRET = b"0123456789abcdef-test-secret-0123456789"


def beat(agent: str) -> hb.Heartbeat:
    return hb.Heartbeat(agent_id=agent, task_id="t", status=hb.RUNNING, timestamp=int(time.time() * 1000), cpu_util=0.1)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def auth_stub(settings: Settings):
    node = Ingest(dataclasses.replace(settings, auth=True, auth_secret=SECRET.decode()))
    await node.start()
    async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
        yield hb_grpc.HeartbeatServiceStub(channel)
    await node.stop(grace=0.5)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_valid_token_accepted(auth_stub) -> None:
    reply = await auth_stub.Beat(beat("agent-1"), metadata=bearer(mint(SECRET, "agent-1", 60)))
    assert reply.received_ms > 0


async def test_missing_token(auth_stub) -> None:
    err = await refused(auth_stub.Beat(beat("agent-1")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "missing credentials" in err.details()


async def test_malformed_and_forged_tokens(auth_stub) -> None:
    err = await refused(auth_stub.Beat(beat("agent-1"), metadata=(("authorization", "Basic abc"),)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.details()
    forged = mint(b"another-secret-of-at-least-32-bytes!", "agent-1", 60)
    err = await refused(auth_stub.Beat(beat("agent-1"), metadata=bearer(forged)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid token" in err.details()


async def test_expired_token(auth_stub) -> None:
    token = mint(SECRET, "agent-1", -10)
    err = await refused(auth_stub.Beat(beat("agent-1"), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in err.details()


async def test_token_of_another_agent(auth_stub) -> None:
    token = mint(SECRET, "agent-1", 60)
    err = await refused(auth_stub.Beat(beat("agent-2"), metadata=bearer(token)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "agent_id" in err.details() and "agent-2" in err.details()

    async def one():
        yield beat("agent-2")

    call = auth_stub.BeatStream(one(), metadata=bearer(token))
    err = await refused(call.read())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_relay_token_speaks_for_its_declared_agents(auth_stub) -> None:
    relay = mint(SECRET, "relay-7", 60, relay_for=("host7-*", "special"))
    batch = hb.BeatBatchRequest(heartbeats=[beat("host7-a"), beat("host7-b"), beat("special"), beat("relay-7")])
    reply = await auth_stub.BeatBatch(batch, metadata=bearer(relay))
    assert reply.accepted == 4
    err = await refused(
        auth_stub.BeatBatch(hb.BeatBatchRequest(heartbeats=[beat("host7-a"), beat("host8-a")]), metadata=bearer(relay))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and err.details().startswith("heartbeats[1].agent_id")
    # an ordinary agent token is no relay token
    err = await refused(
        auth_stub.BeatBatch(
            hb.BeatBatchRequest(heartbeats=[beat("agent-1"), beat("host7-a")]),
            metadata=bearer(mint(SECRET, "agent-1", 60)),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_auth_on_without_secret_refuses_to_start(settings: Settings) -> None:
    from heartbeat_registry.errors import ConfigError

    with pytest.raises(ConfigError, match="HBREG_AUTH=off"):
        Ingest(dataclasses.replace(settings, auth=True))


@pytest.fixture
def pki(tmp_path):
    ca = CA()
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    server = ca.write(tmp_path, "server", "ingest", server=True)
    return ca, tmp_path / "ca.crt", server


async def test_tls_with_token(settings: Settings, pki) -> None:
    ca, ca_path, (cert, key) = pki
    node = Ingest(dataclasses.replace(settings, auth=True, auth_secret=SECRET.decode(), tls_cert=cert, tls_key=key))
    await node.start()
    try:
        creds = grpc.ssl_channel_credentials(ca.pem)
        async with grpc.aio.secure_channel(settings.grpc_addr, creds) as channel:
            reply = await hb_grpc.HeartbeatServiceStub(channel).Beat(
                beat("agent-1"), metadata=bearer(mint(SECRET, "agent-1", 60))
            )
            assert reply.received_ms > 0
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:  # plaintext to a TLS port
            err = await refused(hb_grpc.HeartbeatServiceStub(channel).Beat(beat("agent-1"), timeout=3))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await node.stop(grace=0.5)


async def test_mutual_tls_identity_from_certificate(settings: Settings, pki, tmp_path) -> None:
    ca, ca_path, (cert, key) = pki
    node = Ingest(dataclasses.replace(settings, auth=True, tls_cert=cert, tls_key=key, tls_client_ca=ca_path))
    await node.start()
    try:
        client_cert, client_key = ca.issue("agent-tls")
        creds = grpc.ssl_channel_credentials(ca.pem, client_key, client_cert)
        async with grpc.aio.secure_channel(settings.grpc_addr, creds) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            assert (await stub.Beat(beat("agent-tls"))).received_ms > 0
            err = await refused(stub.Beat(beat("someone-else")))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        stranger_cert, stranger_key = CA("another CA").issue("agent-tls")
        creds = grpc.ssl_channel_credentials(ca.pem, stranger_key, stranger_cert)
        async with grpc.aio.secure_channel(settings.grpc_addr, creds) as channel:
            err = await refused(hb_grpc.HeartbeatServiceStub(channel).Beat(beat("agent-tls"), timeout=3))
            assert err.code() == grpc.StatusCode.UNAVAILABLE  # the handshake itself fails
    finally:
        await node.stop(grace=0.5)
