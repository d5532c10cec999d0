"""`hbreg worker`: one faust worker process of the processors app.

Before faust starts, every topic the worker reads or writes exists with its partitions (the changelogs
of its tables included) and shows in the broker's metadata: on fresh topics faust otherwise saw a
changelog with 0 partitions and crashed its agent every few seconds without ever recovering. The exit
code is non-zero when the worker stopped on its own (processors/app.py), so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import Replication, ensure_topics, pipeline_topics
from processors import faust_adapter


def _logging(settings: Settings) -> dict[str, Any]:
    """The same logfmt lines as every other process; faust's own chatter only from WARNING up."""
    quiet = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"logfmt": {"()": "heartbeat_registry.core.logs.LogfmtFormatter", "proc": "worker"}},
        "filters": {"transient": {"()": "heartbeat_registry.core.logs.TransientKafkaErrors"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "logfmt",
                "filters": ["transient"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": settings.log_level, "handlers": ["default"]},
        "loggers": {name: {"level": quiet} for name in ("faust", "mode", "aiokafka", "kafka")},
    }


def run(settings: Settings) -> int:
    from faust.worker import Worker

    from processors.app import create_app

    settings.require("kafka_bootstrap", "redis_url")
    assert settings.kafka_bootstrap is not None
    faust_adapter.verify(settings.allow_untested_versions)
    asyncio.set_event_loop(asyncio.new_event_loop())
    app, status = create_app(settings)
    topics = pipeline_topics(Names.of(settings), settings.topic_partitions, Replication.of(settings))
    topics += faust_adapter.changelog_topics(app)
    asyncio.get_event_loop().run_until_complete(ensure_topics(settings.kafka_bootstrap, topics))
    # The worker keeps one small object graph per agent and allocates per heartbeat: with the default
    # thresholds the collector ran hundreds of times a second; this makes young collections rarer and
    # full ones (which walk every agent's state) rarer still.
    gc.set_threshold(50_000, 20, 50)
    gc.freeze()  # what exists after start-up (code, faust) is never garbage
    worker = Worker(app, loglevel=settings.log_level.lower(), quiet=True, logging_config=_logging(settings))
    worker.spinner = None  # a terminal progress spinner garbles `hbreg up` output and log files
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:  # pragma: no cover - execute_from_commandline always exits
        code = 0
    return 1 if status.fatal is not None else code
