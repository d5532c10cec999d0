"""`hbreg send`: one heartbeat by hand (a debugging aid), with the reply printed as JSON."""

from __future__ import annotations

import json
import sys

import grpc

from heartbeat_registry.beats import heartbeat
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.shapes import reply_json
from heartbeat_registry.hbreg.tokens import agent_token
from heartbeat_registry.pb import hb, hb_grpc

LOCAL_TOKEN_TTL_S = 300.0


def send(
    settings: Settings,
    agent: str,
    task: str,
    status: str,
    cpu: float,
    progress: float | None,
    token: str | None,
    timeout: float,
) -> int:
    """Send one Beat; prints the reply (rc 0) or the refusal's status and message (rc 1)."""
    beat = heartbeat(agent, task, hb.Status.Value(status), cpu, progress=progress, seq=1)
    if token is None and settings.auth and settings.signing_secret(kept_by_up=True) is not None:
        token = agent_token(settings, agent, LOCAL_TOKEN_TTL_S)  # on the ingest's machine: its own secret
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(settings.grpc_addr) as channel:
        stub = hb_grpc.HeartbeatServiceStub(channel)
        try:
            reply = stub.Beat(beat, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"hbreg send: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(reply_json(reply)))
    return 0
