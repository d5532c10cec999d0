"""Prometheus metrics of the bridge and the faust workers."""

from prometheus_client import Counter, Gauge, Histogram

BRIDGE_FORWARDED = Counter("hbreg_bridge_heartbeats_forwarded_total", "Heartbeats produced to Kafka and XACKed")
BRIDGE_SEND = Histogram(
    "hbreg_bridge_kafka_send_seconds",
    "Time until Kafka acknowledged one forward cycle",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BRIDGE_UNITS = Gauge(
    "hbreg_bridge_shards_held",
    "Shard leases this bridge holds (all shards count as one when they do not match the partitions)",
)
BRIDGE_UNDECODABLE = Counter(
    "hbreg_bridge_undecodable_entries_total",
    "Shard stream entries that are no packed heartbeats as the ingest writes them, counted, acknowledged and "
    "not forwarded",
)
BRIDGE_WATERMARK_AGE = Gauge("hbreg_bridge_watermark_age_seconds", "Wall clock minus the bridge's watermark")

WORKER_HEARTBEATS = Counter("hbreg_worker_heartbeats_total", "Heartbeats processed by this worker")
WORKER_LATE = Counter(
    "hbreg_worker_closed_window_heartbeats_total",
    "Heartbeats dropped because their window was already closed: replays after a restart, or later than "
    "HBREG_WINDOW_GRACE",
)
WORKER_REPEATED = Counter(
    "hbreg_worker_repeated_heartbeats_total",
    "Heartbeats stored twice and counted once: an agent sent an unanswered heartbeat again to another ingest "
    "and both stored it",
)
WORKER_EARLY = Counter(
    "hbreg_worker_early_records_total",
    "Records dropped because they came ahead of the one their partition needed (after a rebalance; the "
    "worker seeks the partition back and they come again in order)",
)
WORKER_SEEKS = Counter(
    "hbreg_worker_seeks_back_total",
    "Times a partition was sought back to the record it needed because records came ahead of it",
)
WORKER_MISSED = Counter(
    "hbreg_worker_missed_records_total",
    "Records a partition went on without: committed by faust before this worker folded them in, or deleted",
)
WORKER_EVENTS = Counter("hbreg_worker_events_total", "Events emitted", ["type", "reason"])
WORKER_SENT_BEFORE = Counter(
    "hbreg_worker_events_sent_before_total",
    "Events a partition restored from its snapshot judged again and did not send: its previous owner had "
    "sent them after that snapshot was saved, and died before saving the next",
)
WORKER_AGENTS = Gauge("hbreg_worker_agents", "Agents tracked on this worker's partitions")
WORKER_WATERMARK_AGE = Gauge("hbreg_worker_watermark_age_seconds", "Wall clock minus the newest watermark seen")
WORKER_POISON = Counter(
    "hbreg_worker_undecodable_records_total", "heartbeats records that are no HeartbeatColumns, counted and skipped"
)
WORKER_SELF_TICKS = Counter(
    "hbreg_worker_self_ticks_total",
    "Watermark ticks the worker sent to a quiet partition of its own so that deferred window writes complete",
)
