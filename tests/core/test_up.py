"""`hbreg up` as a user runs it: embedded Valkey and Kafka, the demo fleet, a second terminal, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from heartbeat_registry.hbreg import services
from tests.infra.test_grafana import exported_metrics, queried_metrics

pytestmark = pytest.mark.kafka


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def hbreg(*args: str, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "heartbeat_registry", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


METRICS_ADDRS = (
    "INGEST_METRICS_ADDR",
    "BRIDGE_METRICS_ADDR",
    "HTTP_ADDR",
    "REASSIGN_METRICS_ADDR",
    "ASSIGNER_METRICS_ADDR",
    "ALERTS_METRICS_ADDR",
)


def up_env(tmp_path, **extra: str) -> dict[str, str]:
    """A user's environment without HBREG_ variables, but free ports and its own state directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HBREG_")}
    env.update(
        HBREG_STATE_DIR=str(tmp_path / "state"),
        HBREG_GRPC_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_INGEST_METRICS_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_BRIDGE_METRICS_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_WORKER_WEB_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_HTTP_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_REASSIGN_METRICS_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_ASSIGNER_METRICS_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_ALERTS_METRICS_ADDR=f"127.0.0.1:{services.free_port()}",
        HBREG_TOPIC_PARTITIONS="2",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def up_env_on(tmp_path, valkey_url: str, kafka_bootstrap: str, prefix: str, **extra: str) -> dict[str, str]:
    """`up_env` on the session's Valkey and Kafka, isolated by `prefix` (no embedded broker to start)."""
    return up_env(
        tmp_path,
        HBREG_REDIS_URL=valkey_url,
        HBREG_KAFKA_BOOTSTRAP=kafka_bootstrap,
        HBREG_KEY_PREFIX=prefix,
        HBREG_TOPIC_PREFIX=prefix + "-",
        **extra,
    )


def test_up_runs_the_demo_and_stops_cleanly(tmp_path) -> None:
    if not services.kafka_available():
        pytest.fail(f"needs the real Apache Kafka broker: {services.why_not_kafka()}")
    env = up_env(tmp_path, HBREG_STALL_TIMEOUT="2")
    state_file = tmp_path / "state" / "state.json"
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed after the process ends
    up = subprocess.Popen(
        [sys.executable, "-m", "heartbeat_registry", "up", "--demo", "4"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    follower = None
    try:
        started = time.monotonic()
        while not state_file.exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() - started < 60, "hbreg up took more than 60 s"
            time.sleep(0.2)
        state = json.loads(state_file.read_text())
        assert state["broker"] == "kafka"
        assert set(state["processes"]) == {
            "valkey",
            "kafka",
            "alertmanager",
            "ingest",
            "bridge",
            "worker",
            "query",
            "reassign",
            "assigner",
            "alerter",
        }

        # a second terminal finds the running system through the state file
        sent = hbreg("send", "--agent", "cli-agent", "--task", "t1", "--status", "RUNNING", "--cpu", "0.4", env=env)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["received_ms"] > 0
        refused = hbreg("send", "--agent", "cli-agent", "--status", "RUNNING", "--cpu", "1.5", env=env)
        assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "cpu_util" in refused.stderr

        follower = subprocess.Popen(
            [sys.executable, "-m", "heartbeat_registry", "events", "--follow", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        stall = None
        while stall is None and time.monotonic() < deadline:
            line = follower.stdout.readline()
            if line:
                event = json.loads(line)
                if event["type"] == "stall" and event["agent_id"].startswith("sim-"):
                    stall = event
        assert stall is not None, "no stall event from the demo fleet"
        assert {"type", "agent_id", "task_id", "reason", "last_seen_ms", "detected_at_ms"} <= set(stall)
        assert stall["reason"] == "silent" and stall["detected_at_ms"] >= stall["last_seen_ms"] + 2000
        # without --follow: the last day's events in time order, then exit 0
        history = hbreg("events", "--json", env=env)
        assert history.returncode == 0, history.stderr
        past = [json.loads(line) for line in history.stdout.splitlines()]
        assert stall["event_id"] in {e["event_id"] for e in past}
        assert [e["detected_at_ms"] for e in past] == sorted(e["detected_at_ms"] for e in past)
        alerts = hbreg("alerts", "--json", env=env)  # the embedded Alertmanager, through the query API
        assert alerts.returncode == 0 and set(json.loads(alerts.stdout)) == {"firing", "notifications"}, alerts.stderr
        listed = hbreg("agents", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        agents = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {a["agent_id"] for a in agents} >= {f"sim-{i:05d}" for i in range(4)}
        windows = hbreg("windows", "sim-00001", "--since", "1m", "--json", env=env)
        assert windows.returncode == 0 and windows.stdout.strip(), windows.stderr
        # every metric the Grafana dashboard queries is one these processes export
        metrics_pages = [env[f"HBREG_{name}"] for name in METRICS_ADDRS]
        missing = queried_metrics() - exported_metrics([env["HBREG_WORKER_WEB_ADDR"], *metrics_pages])
        assert not missing, f"infra/grafana queries metrics no process exports: {sorted(missing)}"
    finally:
        if follower:
            follower.kill()
            follower.wait()
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    left = [name for name, pid in state["processes"].items() if alive(pid)]
    assert not left, f"still running after SIGTERM: {left}"
    assert not state_file.exists()


def test_ctrl_c_with_stdout_gone_still_stops_everything(tmp_path, valkey_url: str, kafka_bootstrap: str) -> None:
    """`hbreg up | tee log`, then Ctrl-C: tee dies with it, so stdout is a closed pipe; every process still
    stops and the state file goes."""
    prefix = "up" + os.urandom(4).hex()
    env = up_env_on(tmp_path, valkey_url, kafka_bootstrap, prefix)
    state_file = tmp_path / "state" / "state.json"
    up = subprocess.Popen(
        [sys.executable, "-m", "heartbeat_registry", "up", "--demo", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        started = time.monotonic()
        while not state_file.exists():
            assert up.poll() is None, up.stdout.read().decode()[-3000:]
            assert time.monotonic() - started < 60, "hbreg up took more than 60 s"
            time.sleep(0.2)
        state = json.loads(state_file.read_text())
        up.stdout.close()  # the reader (tee) is gone
        time.sleep(1.0)  # the children keep writing meanwhile
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
    finally:
        if up.poll() is None:
            up.kill()
    assert code == 0
    assert not state_file.exists(), "stale state file"
    left = [name for name, pid in state["processes"].items() if alive(pid)]
    assert not left, f"still running after Ctrl-C: {left}"
