"""The project's errors, in one place, so every entry point reports them the same way."""

from __future__ import annotations


class HeartbeatRegistryError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(HeartbeatRegistryError):
    """A setting or flag is malformed; the message names it and what it expects."""


class ServiceError(HeartbeatRegistryError):
    """An embedded service (Valkey, Kafka, Tansu) could not be found or started."""
