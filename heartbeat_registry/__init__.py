"""Heartbeat Registry: the agent-side client.

    from heartbeat_registry import AsyncHeartbeatClient, HeartbeatClient, TaskAbandoned, TlsConfig

Importing this package needs only grpcio, protobuf and psutil. The operators' tools (`hbreg`, in
`heartbeat_registry.hbreg`), the shared server-side core (`heartbeat_registry.core`) and the services
(`ingest`, `processors`, `sinks`) need the `[server]` extra and are never imported from here.
"""

from heartbeat_registry.client import Assignment, AsyncHeartbeatClient, HeartbeatClient, TaskContext, TlsConfig
from heartbeat_registry.errors import HeartbeatRegistryError, HeartbeatRejected, TaskAbandoned

__version__ = "0.1.0"

__all__ = [
    "Assignment",
    "AsyncHeartbeatClient",
    "HeartbeatClient",
    "HeartbeatRegistryError",
    "HeartbeatRejected",
    "TaskAbandoned",
    "TaskContext",
    "TlsConfig",
    "__version__",
]
