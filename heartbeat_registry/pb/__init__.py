"""Generated protobuf and gRPC modules of `proto/heartbeat/v1/heartbeat.proto` (run `make proto`)."""

from heartbeat_registry.pb.heartbeat.v1 import heartbeat_pb2 as hb
from heartbeat_registry.pb.heartbeat.v1 import heartbeat_pb2_grpc as hb_grpc

# the services' full names, as gRPC health, reflection and interceptors know them
HEARTBEAT_SERVICE: str = hb.DESCRIPTOR.services_by_name["HeartbeatService"].full_name
TASK_SERVICE: str = hb.DESCRIPTOR.services_by_name["TaskService"].full_name

__all__ = ["HEARTBEAT_SERVICE", "TASK_SERVICE", "hb", "hb_grpc"]
