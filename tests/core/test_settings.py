from __future__ import annotations

import pathlib

import pytest

from heartbeat_registry.core.settings import Settings, describe
from heartbeat_registry.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    s = Settings.from_env({}, use_state=False)
    assert s.grpc_addr == "127.0.0.1:50051"
    assert s.stall_timeout == 5.0
    assert s.topic_partitions == 8
    assert s.redis_url is None and s.kafka_bootstrap is None


def test_environment_and_overrides() -> None:
    env = {"HBREG_STALL_TIMEOUT": "2.5", "HBREG_TOPIC_PARTITIONS": "3", "HBREG_REDIS_URL": "redis://h:1"}
    s = Settings.from_env(env, use_state=False, grpc_addr="0.0.0.0:6000")
    assert (s.stall_timeout, s.topic_partitions, s.redis_url, s.grpc_addr) == (2.5, 3, "redis://h:1", "0.0.0.0:6000")


@pytest.mark.parametrize(
    "var, value, expects",
    [
        ("HBREG_STALL_TIMEOUT", "soon", "a number of seconds > 0"),
        ("HBREG_STALL_TIMEOUT", "-1", "a number of seconds > 0"),
        ("HBREG_STALL_TIMEOUT", "nan", "a number of seconds > 0"),
        ("HBREG_TOPIC_PARTITIONS", "0", "a whole number > 0"),
        ("HBREG_TOPIC_PARTITIONS", "2.5", "a whole number > 0"),
        ("HBREG_GRPC_ADDR", "localhost", "HOST:PORT"),
        ("HBREG_GRPC_ADDR", "h:70000", "HOST:PORT"),
        ("HBREG_REDIS_URL", "http://x", "redis://"),
        ("HBREG_KAFKA_BOOTSTRAP", "a:1,b", "HOST:PORT"),
        ("HBREG_KEY_PREFIX", "a b", "letters"),
    ],
)
def test_malformed_value_names_the_variable(var: str, value: str, expects: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({var: value}, use_state=False)
    message = str(err.value)
    assert message.startswith(f"{var}=") and expects in message
    assert "\n" not in message


def test_min_insync_replicas_cannot_exceed_the_replicas() -> None:
    env = {"HBREG_KAFKA_REPLICATION_FACTOR": "3", "HBREG_KAFKA_MIN_INSYNC_REPLICAS": "2"}
    assert Settings.from_env(env, use_state=False).kafka_min_insync_replicas == 2  # the control
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**env, "HBREG_KAFKA_MIN_INSYNC_REPLICAS": "4"}, use_state=False)
    message = str(err.value)
    assert message.startswith("HBREG_KAFKA_MIN_INSYNC_REPLICAS=4 exceeds HBREG_KAFKA_REPLICATION_FACTOR=3")
    assert "\n" not in message


def test_readme_documents_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [var for var, _, _ in describe() if var not in readme]
    assert not missing, f"README.md does not document {missing}"
