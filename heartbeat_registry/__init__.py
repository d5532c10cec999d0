"""Heartbeat Registry: the agent-side core (settings, names, wire contract, CLI).

Importing this package needs only grpcio and protobuf; the services live in `ingest`, `processors` and
`sinks` and need the `[server]` extra.
"""

__version__ = "0.1.0"
