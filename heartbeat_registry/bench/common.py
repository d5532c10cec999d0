"""What every benchmark needs: percentiles, the embedded services, child processes."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

from heartbeat_registry import embedded


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    values = sorted(latencies_s)
    return {
        "p50_ms": round(percentile(values, 0.50) * 1000, 3),
        "p99_ms": round(percentile(values, 0.99) * 1000, 3),
        "p999_ms": round(percentile(values, 0.999) * 1000, 3),
    }


@contextlib.contextmanager
def workdir() -> Iterator[pathlib.Path]:
    path = pathlib.Path(tempfile.mkdtemp(prefix="hbreg-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], log: pathlib.Path) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def embedded_valkey(directory: pathlib.Path) -> Iterator[str]:
    port = embedded.free_port()
    with process(embedded.valkey_command(port, directory / "valkey", durable=False), dict(os.environ),
                 directory / "valkey.log"):
        embedded.wait_port("127.0.0.1", port, 15, "valkey")
        yield f"redis://127.0.0.1:{port}"


@contextlib.contextmanager
def embedded_kafka(directory: pathlib.Path) -> Iterator[str]:
    port = embedded.free_port()
    cmd = embedded.kafka_command(port, directory / "kafka") if embedded.kafka_available() else embedded.tansu_command(port)
    with process(cmd, dict(os.environ), directory / "kafka.log"):
        embedded.wait_port("127.0.0.1", port, 60, "kafka")
        yield f"127.0.0.1:{port}"


def hbreg_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "heartbeat_registry", *args]
