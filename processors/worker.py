"""`hbreg worker`: one faust worker process of the processors app."""

from __future__ import annotations

import asyncio
import logging

from heartbeat_registry.names import Names
from heartbeat_registry.settings import Settings
from processors.topics import ensure_topics


def run(settings: Settings) -> int:
    from faust.worker import Worker

    from processors.app import create_app

    settings.require("kafka_bootstrap")
    # The source topic must exist with its partition count before faust declares tables on it.
    asyncio.run(ensure_topics(settings.kafka_bootstrap, Names.of(settings), settings.topic_partitions))
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = create_app(settings)
    faust_level = "debug" if settings.log_level == "DEBUG" else "warn"
    worker = Worker(app, loglevel=faust_level, quiet=True)
    logging.getLogger("processors").setLevel(settings.log_level)
    worker.execute_from_commandline()
    return 0
