"""The project's public errors, in one place, so every entry point reports them the same way.

Agents meet `TaskAbandoned` (their task went to someone else) and `HeartbeatRejected` (the ingest refused
the heartbeats for a reason retrying cannot fix). Operators' tools and services meet `ConfigError` and
`ServiceError`. (The services' internal refusals, such as the ingest's `Refusal` or the query API's
`BadRequest`, become gRPC statuses or HTTP answers and never reach a caller as exceptions.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heartbeat_registry.pb import hb


class HeartbeatRegistryError(Exception):
    """Base of every error this project raises on purpose."""


class TaskAbandoned(HeartbeatRegistryError):
    """The task was reassigned to another agent (fencing); stop working on it."""

    def __init__(self, directive: hb.Directive) -> None:
        super().__init__(f"task {directive.task_id} was reassigned (epoch {directive.epoch}): {directive.reason}")
        self.directive = directive


class HeartbeatRejected(HeartbeatRegistryError):
    """The ingest refused this agent's heartbeats for a reason that retrying cannot fix (bad or expired
    credentials, an agent id the credentials do not cover, an invalid heartbeat). The client stops beating:
    the agent will be taken for stalled until the program fixes the cause and starts a new client."""

    def __init__(self, code: str, details: str, endpoint: str) -> None:
        super().__init__(f"{code}: {details} (from {endpoint}; retrying cannot fix this, the client stopped beating)")
        self.code = code
        self.details = details
        self.endpoint = endpoint


class ConfigError(HeartbeatRegistryError):
    """A setting or flag is malformed; the message names it and what it expects."""


class ServiceError(HeartbeatRegistryError):
    """An embedded service (Valkey, Kafka, Tansu) could not be found or started."""
