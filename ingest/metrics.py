"""Prometheus metrics of the ingest node."""

from prometheus_client import Counter, Gauge, Histogram

ACCEPTED = Counter("hbreg_ingest_heartbeats_accepted_total", "Heartbeats durable in Redis", ["rpc"])
# the labelled children, looked up once: `labels()` per call was a measurable share of a stream message
ACCEPTED_BY_RPC = {rpc: ACCEPTED.labels(rpc) for rpc in ("beat", "batch", "stream")}
REFUSED = Counter("hbreg_ingest_heartbeats_refused_total", "Heartbeats refused", ["rpc", "reason"])
BATCH_SIZE = Histogram(
    "hbreg_ingest_batch_size", "Heartbeats per BeatBatch request", buckets=(1, 10, 50, 100, 250, 500, 1000, 5000)
)
REDIS_ROUNDTRIP = Histogram(
    "hbreg_ingest_redis_roundtrip_seconds",
    "One group-commit round trip to Redis",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
ACTIVE_STREAMS = Gauge("hbreg_ingest_active_streams", "Open BeatStream calls", multiprocess_mode="livesum")
REDIS_UP = Gauge("hbreg_ingest_redis_up", "1 while Redis answers", multiprocess_mode="livemin")
STREAM_LENGTH = Gauge(
    "hbreg_ingest_stream_entries", "Entries in each Redis stream shard (XLEN)", ["shard"], multiprocess_mode="livemax"
)
TASKS_TAKEN_UP = Histogram(
    "hbreg_ingest_task_taken_up_seconds",
    "Task assigned -> its assignee beat RUNNING on it (it owns it)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
CONFIRMS_FAILED = Counter(
    "hbreg_ingest_task_confirms_failed_total",
    "RUNNING beats on an offered task stored but not yet made its owner (Redis failed; the next beat confirms)",
)
TASK_CALLS = Counter("hbreg_ingest_task_calls_total", "TaskService calls by outcome", ["outcome"])
