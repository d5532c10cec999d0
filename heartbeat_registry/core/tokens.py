"""Bearer tokens: JWTs (HS256) signed with the server secret, minted by `hbreg token`, the simulated
fleets and the reference assigner, and verified by the ingest (ingest/auth.py).

Claims: `sub` the agent id (or the service's name), `exp` the expiry, `agents` for a relay token (the ids or
`prefix*` patterns it may speak for), `role: assigner` for a service token (TaskService, no heartbeats).
"""

from __future__ import annotations

import time
from typing import Any

import jwt

ALGORITHM = "HS256"
AGENT, ASSIGNER = "agent", "assigner"


def mint(secret: bytes, agent_id: str, ttl_s: float, relay_for: tuple[str, ...] = (), role: str = AGENT) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": agent_id, "iat": now, "exp": now + int(ttl_s)}
    if relay_for:
        claims["agents"] = list(relay_for)
    if role != AGENT:
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
