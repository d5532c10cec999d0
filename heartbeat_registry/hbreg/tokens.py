"""Bearer tokens minted by the operators' tools: `hbreg token`, `hbreg send` on the ingest's machine,
and the simulated fleets. The secret is the settings' (variables, or the one `hbreg up` keeps)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tokens import AGENT, mint
from heartbeat_registry.errors import ConfigError
from ingest.validate import Refusal, check_id

NO_SECRET = (
    "no signing secret: set HBREG_AUTH_SECRET or HBREG_AUTH_SECRET_FILE, or run `hbreg up` once (it keeps one in "
    "HBREG_STATE_DIR)"
)


def agent_token(
    settings: Settings, agent_id: str, ttl_s: float, relay_for: Sequence[str] = (), role: str = AGENT
) -> str:
    """A token for `agent_id` (and, for a relay, the agents or `prefix*` patterns of `relay_for`; with
    role `assigner`, a service token for TaskService)."""
    secret = settings.signing_secret(kept_by_up=True)
    if secret is None:
        raise ConfigError(NO_SECRET)
    try:
        check_id(agent_id, "AGENT")
        for pattern in relay_for:
            check_id(pattern.removesuffix("*"), "--relay-for")
    except Refusal as exc:
        raise ConfigError(str(exc)) from None
    return mint(secret, agent_id, ttl_s, tuple(relay_for), role)


def fleet_tokens(settings: Settings, ttl_s: float = 86400.0) -> Callable[[str], str] | None:
    """Tokens for simulated agents when auth is on (None when it is off)."""
    if not settings.auth:
        return None
    secret = settings.signing_secret(kept_by_up=True)
    if secret is None:
        raise ConfigError(f"auth is on and simulated agents need tokens: {NO_SECRET}; or set HBREG_AUTH=off")
    return lambda agent: mint(secret, agent, ttl_s)
