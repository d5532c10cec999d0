"""When a worker gives up on a table recovery that reads nothing, and that it then exits."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from heartbeat_registry.core.names import Names
from processors.recovery_watch import STUCK_ERROR, STUCK_S, RecoveryWatch
from tests import procs
from tests.processors.conftest import running_pipeline


def test_a_recovery_that_reads_nothing_for_the_limit_is_stuck() -> None:
    watch = RecoveryWatch(limit_s=10.0)
    assert not watch.stuck(True, 49, now=100.0)
    assert not watch.stuck(True, 49, now=109.9)
    assert watch.stuck(True, 49, now=110.0)


def test_a_record_read_or_a_new_recovery_starts_the_count_again() -> None:
    watch = RecoveryWatch(limit_s=10.0)
    watch.stuck(True, 49, now=100.0)
    assert not watch.stuck(True, 30, now=108.0)  # read 19 records
    assert not watch.stuck(True, 30, now=117.0)
    assert watch.stuck(True, 30, now=118.0)
    assert not watch.stuck(False, 0, now=119.0)  # done
    assert not watch.stuck(True, 30, now=125.0)  # the next recovery counts from its own start
    assert not watch.stuck(True, 30, now=134.0)


def test_no_recovery_or_nothing_left_is_never_stuck() -> None:
    watch = RecoveryWatch(limit_s=1.0)
    for now in range(0, 100, 10):
        assert not watch.stuck(False, 49, now=float(now))  # not recovering (the counters are stale)
        assert not watch.stuck(True, 0, now=float(now))  # up to date, waiting for nothing


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_worker_whose_recovery_reads_nothing_exits_to_be_started_again(pipeline_settings, tmp_path) -> None:
    """A transaction's commit marker ends a changelog partition at an offset where no record is ever
    delivered: faust's recovery waits for it as it waited in the soak for records it never got. The
    worker's very first recovery sticks there (before faust starts any timer of the app), and the worker
    exits non-zero within the watch's limit, saying why."""
    async with running_pipeline(pipeline_settings, tmp_path) as running:
        procs.stop(running.workers.pop())  # it had started and recovered (the positive control)
        producer = AIOKafkaProducer(
            bootstrap_servers=pipeline_settings.kafka_bootstrap, transactional_id=f"stick-{uuid.uuid4()}"
        )
        await producer.start()
        try:
            # a tombstone for a key that never was (JSON, as faust's keys): it changes nothing
            async with producer.transaction():
                changelog = f"{Names.of(pipeline_settings).processors_app_id}-snapshots-changelog"
                await producer.send_and_wait(changelog, key=b'"no-such-key"', value=None, partition=0)
        finally:
            await producer.stop()
        log = tmp_path / "stuck-worker.log"
        worker = procs.hbreg(["worker"], pipeline_settings, log)
        try:
            code: int | None = await asyncio.to_thread(worker.wait, STUCK_S + 40)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if worker.poll() is None:
                procs.stop(worker, signal.SIGKILL)
        assert code == 1, log.read_text()[-3000:]
        assert f"{STUCK_ERROR} for 10 s with 1 left" in log.read_text()
