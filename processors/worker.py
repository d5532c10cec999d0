"""`hbreg worker`: one faust worker process of the processors app."""

from __future__ import annotations

import asyncio
import gc

from heartbeat_registry.names import Names
from heartbeat_registry.settings import Settings
from processors.topics import ensure_topics


def _logging(settings: Settings) -> dict:
    """The same logfmt lines as every other process; faust's own chatter only from WARNING up."""
    quiet = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"logfmt": {"()": "heartbeat_registry.ops.LogfmtFormatter", "proc": "worker"}},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "logfmt", "stream": "ext://sys.stderr"}
        },
        "root": {"level": settings.log_level, "handlers": ["default"]},
        "loggers": {name: {"level": quiet} for name in ("faust", "mode", "aiokafka", "kafka")},
    }


def run(settings: Settings) -> int:
    from faust.worker import Worker

    from processors.app import create_app

    settings.require("kafka_bootstrap")
    # The source topic must exist with its partition count before faust declares tables on it.
    asyncio.run(ensure_topics(settings.kafka_bootstrap, Names.of(settings), settings.topic_partitions))
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = create_app(settings)
    # The worker keeps one small object graph per agent and allocates per heartbeat: with the default
    # thresholds the collector ran hundreds of times a second; this makes young collections rarer and
    # full ones (which walk every agent's state) rarer still.
    gc.set_threshold(50_000, 20, 50)
    gc.freeze()  # what exists after start-up (code, faust) is never garbage
    worker = Worker(app, loglevel=settings.log_level.lower(), quiet=True, logging_config=_logging(settings))
    worker.spinner = None  # a terminal progress spinner garbles `hbreg up` output and log files
    worker.execute_from_commandline()
    return 0
