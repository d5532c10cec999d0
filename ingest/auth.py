"""Who is calling: per-agent tokens and client certificates.

A token is a JWT (HS256, signed with the server secret): `sub` is the agent id, `exp` its expiry, and a
relay token adds `agents`, the ids (or `prefix*` patterns) it may speak for. A service token has
`role: assigner`: it may call TaskService (hand orphaned tasks to agents) and send no heartbeats, while an
agent's token may never assign. Tokens travel as gRPC
metadata `authorization: Bearer TOKEN`. With mutual TLS and no token, the client certificate's common
name is the agent id. Every heartbeat's agent_id must be one the caller may speak for, so no agent can
pose as another.

Verification happens once per call (once per BeatStream, not per message) and verified tokens are
cached until they expire, so auth costs a dict lookup on the hot path.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import jwt

from heartbeat_registry.core.tokens import AGENT, ALGORITHM, ASSIGNER
from ingest import metrics

_CACHE_LIMIT = 100_000


class AuthError(Exception):
    """The caller could not be authenticated; the message says why."""


@dataclasses.dataclass(frozen=True)
class Identity:
    agent_id: str
    relay_for: tuple[str, ...] = ()
    expires: float = float("inf")
    role: str = "agent"  # agent | assigner | * (auth off)
    # agents already matched against relay_for (a relay names the same agents in every batch)
    _allowed: set[str] = dataclasses.field(default_factory=set, compare=False, repr=False)

    def allows(self, agent_id: str) -> bool:
        """May this caller send heartbeats for `agent_id`?"""
        if self.role == ASSIGNER:
            return False
        if agent_id == self.agent_id or agent_id in self._allowed:
            return True
        for pattern in self.relay_for:
            if pattern == agent_id or pattern == "*" or (pattern.endswith("*") and agent_id.startswith(pattern[:-1])):
                if len(self._allowed) < 1_000_000:
                    self._allowed.add(agent_id)
                return True
        return False


ANYONE = Identity("*", ("*",), role="*")


class Authenticator:
    def __init__(self, secret: bytes | None, enabled: bool, mtls: bool) -> None:
        if enabled and secret is None and not mtls:
            raise AuthError(
                "auth is on but HBREG_AUTH_SECRET / HBREG_AUTH_SECRET_FILE is not set "
                "(set one, configure HBREG_TLS_CLIENT_CA, or set HBREG_AUTH=off explicitly)"
            )
        self._secret = secret
        self.enabled = enabled
        self._mtls = mtls
        self._cache: dict[str, Identity] = {}

    def from_token(self, token: str) -> Identity:
        cached = self._cache.get(token)
        if cached is not None and cached.expires > time.time():
            return cached
        if self._secret is None:
            raise AuthError("tokens are not accepted here (no signing secret): use a client certificate")
        try:
            claims = jwt.decode(token, self._secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        agents = claims.get("agents") or ()
        if not isinstance(agents, (list, tuple)) or not all(isinstance(a, str) for a in agents):
            raise AuthError("invalid token: `agents` must be a list of agent ids")
        role = claims.get("role", AGENT)
        if role not in (AGENT, ASSIGNER):
            raise AuthError(f"invalid token: unknown role {role!r}")
        identity = Identity(str(claims["sub"]), tuple(agents), float(claims["exp"]), role=role)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = identity
        return identity

    def identify(self, context: grpc.aio.ServicerContext) -> Identity:
        if not self.enabled:
            return ANYONE
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value
                break
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise AuthError("authorization metadata must be 'Bearer TOKEN'")
            return self.from_token(token.strip())
        if self._mtls:
            names = context.auth_context().get("x509_common_name") or []
            if names:
                return Identity(names[0].decode())
        raise AuthError("missing credentials: send 'authorization: Bearer TOKEN' metadata")


Handler = Callable[..., Any]


class Requests:
    """The requests of a streaming call, decoded one at a time (grpc's reader API: no generator
    layers per message, which is where a Python gRPC stream spends much of its time)."""

    __slots__ = ("_context", "_parse", "_rpc")

    def __init__(self, context: grpc.aio.ServicerContext, parse: Callable[[bytes], Any], rpc: str) -> None:
        self._context = context
        self._parse = parse
        self._rpc = rpc

    async def read(self) -> Any | None:
        """The next request, or None when the client finished sending."""
        data = await self._context.read()
        if data is grpc.aio.EOF:
            return None
        try:
            return self._parse(data)
        except Exception:
            return await _undecodable(self._context, self._rpc)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call to `services` before the servicer runs; the servicer gets the caller's
    Identity as an extra argument and checks each heartbeat's agent_id against it. It also decodes the
    requests itself, so that bytes that are no valid message get a clear INVALID_ARGUMENT. Unary
    servicer methods take (request, context, identity); streaming ones (Requests, context, identity) and
    answer with context.write()."""

    def __init__(self, authenticator: Authenticator, services: tuple[str, ...]) -> None:
        self._auth = authenticator
        self._prefixes = tuple(f"/{service}/" for service in services)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # the wrappers do not depend on the call

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        wrapped = self._wrapped.get(details.method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes):
            return handler
        wrapped = self._wrapped[details.method] = self._wrap(handler, details.method.rsplit("/", 1)[1].lower())
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        auth = self._auth
        parse = handler.request_deserializer
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(data: bytes, context: grpc.aio.ServicerContext) -> Any:
                # no coroutine per step on the way in: the failures await, the common case does not
                try:
                    identity = auth.identify(context)
                except AuthError as exc:
                    await _unauthenticated(context, rpc, exc)
                try:
                    request = parse(data)
                except Exception:
                    request = await _undecodable(context, rpc)
                return await inner(request, context, identity)

            return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)
        inner_stream = handler.stream_stream

        async def stream(_: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            try:
                identity = auth.identify(context)  # once per stream, not per message
            except AuthError as exc:
                await _unauthenticated(context, rpc, exc)
            await inner_stream(Requests(context, parse, rpc), context, identity)

        return grpc.stream_stream_rpc_method_handler(stream, None, handler.response_serializer)


async def _undecodable(context: grpc.aio.ServicerContext, rpc: str) -> NoReturn:
    """Requests are decoded here rather than in grpc, so undecodable bytes get INVALID_ARGUMENT, not
    INTERNAL."""
    metrics.REFUSED.labels(rpc, "undecodable").inc()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid protobuf message for this RPC")
    raise AssertionError("abort raises")


async def _unauthenticated(context: grpc.aio.ServicerContext, rpc: str, exc: AuthError) -> NoReturn:
    metrics.REFUSED.labels(rpc, "unauthenticated").inc()
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    raise AssertionError("abort raises")
