"""The ingest node: gRPC heartbeats in, durable Redis Streams entries out."""
