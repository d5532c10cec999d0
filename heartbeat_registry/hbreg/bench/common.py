"""What every benchmark needs: percentiles, the embedded services, child processes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services


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
    port = services.free_port()
    with process(
        services.valkey_command(port, directory / "valkey", durable=False), dict(os.environ), directory / "valkey.log"
    ):
        services.wait_port("127.0.0.1", port, 15, "valkey")
        yield f"redis://127.0.0.1:{port}"


@contextlib.contextmanager
def embedded_kafka(directory: pathlib.Path) -> Iterator[str]:
    port = services.free_port()
    cmd = (
        services.kafka_command(port, directory / "kafka")
        if services.kafka_available()
        else services.tansu_command(port)
    )
    with process(cmd, dict(os.environ), directory / "kafka.log"):
        services.wait_port("127.0.0.1", port, 60, "kafka")
        yield f"127.0.0.1:{port}"


def hbreg_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "heartbeat_registry", *args]


def base_settings(
    stack: contextlib.ExitStack, tmp: pathlib.Path, redis_url: str | None, kafka_bootstrap: str | None
) -> Settings:
    """Settings for a benchmark: the given Redis and Kafka, or embedded ones started for the run."""
    if redis_url is None:
        redis_url = stack.enter_context(embedded_valkey(tmp))
    if kafka_bootstrap is None:
        kafka_bootstrap = stack.enter_context(embedded_kafka(tmp))
    return Settings(redis_url=redis_url, kafka_bootstrap=kafka_bootstrap, state_dir=tmp / "state")


def isolated(base: Settings, tag: str, **changes: Any) -> Settings:
    """`base` with its own key and topic prefix and free ports, so runs never see each other's data."""
    prefix = f"bench{tag}{secrets.token_hex(3)}"
    return dataclasses.replace(
        base,
        key_prefix=prefix,
        topic_prefix=prefix + "-",
        auth=False,
        log_level="WARNING",
        grpc_addr=f"127.0.0.1:{services.free_port()}",
        http_addr=f"127.0.0.1:{services.free_port()}",
        ingest_metrics_addr=f"127.0.0.1:{services.free_port()}",
        bridge_metrics_addr=f"127.0.0.1:{services.free_port()}",
        worker_web_addr=f"127.0.0.1:{services.free_port()}",
        reassign_metrics_addr=f"127.0.0.1:{services.free_port()}",
        assigner_metrics_addr=f"127.0.0.1:{services.free_port()}",
        alerts_metrics_addr=f"127.0.0.1:{services.free_port()}",
        rate_limit=1000.0,
        rate_burst=1000.0,
        **changes,
    )


def wait_worker(addr: str, proc: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    """Until the faust worker serving `addr` owns partitions (its consumer group joined); fails at once
    if `proc`, the worker, exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{addr}/healthz", timeout=1) as response:
                if json.load(response)["partitions"]:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the worker did not join its consumer group within {timeout} s")


@contextlib.contextmanager
def service(settings: Settings, command: str, log_dir: pathlib.Path) -> Iterator[subprocess.Popen]:
    """`hbreg COMMAND` as a process configured by `settings`."""
    env = {**os.environ, **settings.child_env()}
    with process(hbreg_argv(command), env, log_dir / f"{command}-{settings.key_prefix}.log") as proc:
        yield proc


def metric(addr: str, name: str) -> float:
    """The value of an unlabelled sample `name` on the `/metrics` page at `addr` (0 when absent)."""
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0
