"""Generated protobuf and gRPC modules of `proto/heartbeat/v1/heartbeat.proto` (run `make proto`)."""

from heartbeat_registry.pb.heartbeat.v1 import heartbeat_pb2 as hb
from heartbeat_registry.pb.heartbeat.v1 import heartbeat_pb2_grpc as hb_grpc

__all__ = ["hb", "hb_grpc"]
