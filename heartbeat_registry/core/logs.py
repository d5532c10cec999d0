"""Structured logs: every process writes the same one-line logfmt records to stderr.

`ts=... level=... proc=... logger=... msg="..." key=value ...`: extra fields given with `extra={...}`
become keys, so logs can be filtered by agent, shard or error without parsing prose.

Kafka clients log a few conditions at ERROR or WARNING that are routine while a broker or consumer group
is starting (a partition leader or group coordinator not elected yet, a metadata refresh racing a new
topic). They are retried by the client and resolve within seconds, so they are shown at INFO; the same
errors persisting surface through the processes' health and lag instead.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# error names aiokafka logs at ERROR while a cluster, topic or group is still settling
TRANSIENT_KAFKA_ERRORS = (
    "NotLeaderForPartitionError",
    "GroupCoordinatorNotAvailableError",
    "CoordinatorNotAvailableError",
    "NotCoordinatorForGroupError",
    "UnknownTopicOrPartitionError",
    "LeaderNotAvailableError",
    "CoordinatorLoadInProgressError",
    "RebalanceInProgressError",
)


class LogfmtFormatter(logging.Formatter):
    def __init__(self, proc: str) -> None:
        super().__init__()
        self.proc = proc

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"proc={self.proc}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                text = value if isinstance(value, (int, float)) else json.dumps(str(value))
                parts.append(f"{key}={text}")
        if record.exc_info:
            parts.append(f"exc={json.dumps(self.formatException(record.exc_info))}")
        return " ".join(parts)


class TransientKafkaErrors(logging.Filter):
    """Shows the routine start-up retries of Kafka clients at INFO (see the module)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and record.name.startswith("aiokafka"):
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += type(record.exc_info[1]).__name__
            if any(name in text for name in TRANSIENT_KAFKA_ERRORS):
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.exc_info = None  # the retry is the whole story; no traceback
                return logging.getLogger().isEnabledFor(logging.INFO)
        return True


def handler(proc: str) -> logging.Handler:
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(LogfmtFormatter(proc))
    out.addFilter(TransientKafkaErrors())
    return out


def setup_logging(proc: str, level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler(proc)]
    root.setLevel(level)
