"""One typed settings object, read from `HBREG_*` environment variables and validated once at start.

A malformed value stops start-up with one line naming the variable and what it expects, because a
service that starts on a half-understood configuration fails later in a much less obvious way.
Addresses of the embedded services come, in order, from the environment, from the state file that
`hbreg up` writes, or are left unset (then `hbreg up` starts its own).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from heartbeat_registry.errors import ConfigError

PREFIX = "HBREG_"


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _seconds(text: str) -> float:
    """Seconds, bare (`2.5`) or with a unit (`250ms`, `30s`, `5m`, `24h`, `7d`)."""
    number, unit = text, "s"
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            number, unit = text[: -len(suffix)], suffix
            break
    value = float(number) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise ValueError
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError
    return value


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError
    return text


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError
    return text


def _urls(text: str) -> str:
    for part in text.split(","):
        if not part.strip().startswith(("http://", "https://")):
            raise ValueError
    return text


def _bootstrap(text: str) -> str:
    for part in text.split(","):
        _address(part.strip())
    return text


def _prefix(text: str) -> str:
    if not all(c.isalnum() or c in "._-" for c in text):
        raise ValueError
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError
    return value


def _switch(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "on", "true", "yes"):
        return True
    if lowered in ("0", "off", "false", "no"):
        return False
    raise ValueError


def _file(text: str) -> pathlib.Path:
    path = pathlib.Path(text).expanduser()
    if not path.is_file():
        raise ValueError
    return path


def _processes(text: str) -> int:
    """A count, or `auto`: one per core this process may run on."""
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return _positive_int(text)


REASONS = ("silent", "hung", "overdue")


def _reasons(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "none":
        return ()
    found = tuple(r.strip() for r in text.split(",") if r.strip())
    if any(r not in REASONS for r in found):
        raise ValueError
    return found


def _local(text: str) -> str:
    from heartbeat_registry.relay import is_local  # the relay's own rule: agents send it no token

    if not is_local(text):
        raise ValueError
    return text


def _level(text: str) -> str:
    if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError
    return text.upper()


# name -> (parser, what the variable expects, in words)
PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "seconds": (_seconds, "a number of seconds > 0 (or with a unit: 250ms, 30s, 5m, 24h, 7d)"),
    "positive": (_positive, "a number > 0"),
    "count": (_positive_int, "a whole number > 0"),
    "processes": (_processes, "a whole number > 0, or auto (one per core)"),
    "address": (_address, "HOST:PORT"),
    "redis_url": (_redis_url, "a redis:// rediss:// or unix:// URL"),
    "bootstrap": (_bootstrap, "HOST:PORT[,HOST:PORT...]"),
    "urls": (_urls, "http(s)://HOST:PORT[,http(s)://HOST:PORT...]"),
    "prefix": (_prefix, "letters, digits, '.', '_' or '-'"),
    "fraction": (_fraction, "a number from 0 to 1"),
    "path": (pathlib.Path, "a path"),
    "level": (_level, "one of DEBUG, INFO, WARNING, ERROR"),
    "switch": (_switch, "on or off (1/0, true/false, yes/no)"),
    "file": (_file, "the path of an existing file"),
    "text": (str, "text"),
    "local": (_local, "unix:///PATH or a loopback HOST:PORT"),
    "reasons": (_reasons, "a comma-separated list of silent, hung, overdue, or none"),
}


def _field(default: Any, kind: str, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"kind": kind, "doc": doc})


def _default_state_dir() -> pathlib.Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return pathlib.Path(base) / "hbreg"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every `HBREG_*` variable; the field name upper-cased is the variable name."""

    grpc_addr: str = _field("127.0.0.1:50051", "address", "where the ingest serves gRPC")
    redis_url: str | None = _field(None, "redis_url", "Redis/Valkey; unset: `hbreg up` starts Valkey")
    redis_cluster: bool = _field(False, "switch", "HBREG_REDIS_URL is the seed node of a Redis Cluster")
    kafka_bootstrap: str | None = _field(None, "bootstrap", "Kafka brokers; unset: `hbreg up` starts Kafka")
    stall_timeout: float = _field(
        5.0, "seconds", "seconds of silence after which an agent that has not left is stalled"
    )
    topic_partitions: int = _field(8, "count", "partitions of the `heartbeats` and `agent-events` topics")
    kafka_replication_factor: int = _field(1, "count", "replicas of every topic the registry creates")
    kafka_min_insync_replicas: int = _field(
        1, "count", "`min.insync.replicas` of every topic; with acks=all a write needs this many replicas"
    )
    stream_shards: int = _field(8, "count", "Redis stream shards (hash-tagged, ready for Redis Cluster)")
    stream_retention: float = _field(3600.0, "seconds", "Redis stream entries older than this are trimmed")
    window_size: float = _field(10.0, "seconds", "tumbling window of the per-agent health table")
    window_grace: float = _field(
        1.0, "seconds", "a window closes this long after the pipeline clock passed its end (late heartbeats)"
    )
    watermark_interval: float = _field(0.1, "seconds", "how often the bridge sends watermark ticks")
    bridge_lease: float = _field(
        3.0, "seconds", "a stopped bridge's shards pass to the other bridges this long after its last renewal"
    )
    watermark_slack: float = _field(0.2, "seconds", "allowed receive-to-Redis delay the watermark trails by")
    key_prefix: str = _field("hbreg", "prefix", "prefix of every Redis key")
    topic_prefix: str = _field("", "prefix", "prefix of every Kafka topic and consumer group")
    state_dir: pathlib.Path = _field(_default_state_dir(), "path", "where `hbreg up` keeps state and data")
    ingest_processes: int = _field(
        1, "processes", "ingest processes sharing the gRPC port (SO_REUSEPORT) under `hbreg ingest` and `hbreg up`"
    )
    ingest_metrics_addr: str = _field("127.0.0.1:9464", "address", "ingest /metrics and /healthz")
    bridge_metrics_addr: str = _field("127.0.0.1:9465", "address", "bridge /metrics and /healthz")
    worker_web_addr: str = _field("127.0.0.1:6066", "address", "faust worker web server (/metrics)")
    instance: str | None = _field(
        None, "text", "a process's stable name in its consumer group: restarted, it takes its partitions back at once"
    )
    log_level: str = _field("INFO", "level", "log level of every process")
    redis_durable: bool = _field(False, "switch", "embedded Valkey keeps an fsynced append-only file")
    auth: bool = _field(True, "switch", "require a per-agent token (or client certificate); off only explicitly")
    auth_secret: str | None = _field(None, "text", "token signing secret")
    auth_secret_file: pathlib.Path | None = _field(None, "file", "file holding the token signing secret")
    tls_cert: pathlib.Path | None = _field(None, "file", "ingest TLS certificate chain (PEM); enables TLS")
    tls_key: pathlib.Path | None = _field(None, "file", "private key of HBREG_TLS_CERT (PEM)")
    tls_client_ca: pathlib.Path | None = _field(None, "file", "CA of client certificates; enables mutual TLS")
    rate_limit: float = _field(20.0, "positive", "heartbeats per second one agent may send (sustained)")
    rate_burst: float = _field(40.0, "positive", "heartbeats one agent may send at once")
    max_batch: int = _field(5000, "count", "heartbeats per BeatBatch request")
    max_message_bytes: int = _field(4 * 1024 * 1024, "count", "largest gRPC request accepted")
    max_clock_skew: float = _field(3600.0, "seconds", "agent timestamps further off the server clock are refused")
    max_pending: int = _field(200_000, "count", "heartbeats waiting for Redis before the ingest refuses more")
    redis_hold: float = _field(
        0.5, "seconds", "how long a heartbeat that arrives while Redis is out waits for it before it is refused"
    )
    stream_open_rate: float = _field(
        1000.0, "positive", "new BeatStreams per second one ingest process takes on; more are refused with a pushback"
    )
    http_addr: str = _field("127.0.0.1:8080", "address", "the query API and the dashboard (HTTP)")
    http_auth: str | None = _field(
        None,
        "text",
        "USER:PASSWORD for the HTTP side (Basic, or the password as a Bearer token); required off localhost",
    )
    phi_threshold: float = _field(8.0, "positive", "phi at which a silent agent is stalled (before the hard timeout)")
    phi_suspect: float = _field(3.0, "positive", "phi from which an alive agent is reported `suspect`")
    acceptable_pause: float = _field(3.0, "seconds", "pause added to an agent's mean beat interval in the phi model")
    min_std: float = _field(0.1, "seconds", "smallest standard deviation of the phi model")
    recovery_beats: int = _field(3, "count", "healthy beats in a row before a stalled agent counts as recovered")
    hung_cpu: float = _field(0.02, "fraction", "RUNNING below this CPU for a whole window is a `hung` stall")
    max_task_duration: float = _field(3600.0, "seconds", "RUNNING one task longer than this is an `overdue` stall")
    mass_silence_fraction: float = _field(
        0.5, "fraction", "share of a partition's agents silent together that is an outage"
    )
    mass_silence_min: int = _field(10, "count", "fewest agents silent together that count as a mass silence")
    mass_silence_hold: float = _field(60.0, "seconds", "longest hold of a mass silence before individual stalls")
    lag_alert: float = _field(
        2.0,
        "seconds",
        "pipeline lag (wall clock minus watermark) that raises `pipeline_lag`; a jump of the pipeline clock by more"
        " than this gives the agents a new deadline",
    )
    window_retention: float = _field(3600.0, "seconds", "how long window rows are kept")
    reassign_on: tuple[str, ...] = _field(REASONS, "reasons", "stall reasons that reassign the agent's task")
    reassign_rate: float = _field(20.0, "positive", "reassignments per second, sustained (more wait in order)")
    reassign_burst: float = _field(50.0, "positive", "reassignments at once before the rate applies")
    assign_timeout: float = _field(
        30.0, "seconds", "an assigned task not taken up (beat RUNNING) by then is orphaned again"
    )
    assigner: bool = _field(True, "switch", "`hbreg up` runs the reference Role Assignment service (`hbreg assigner`)")
    reassign_metrics_addr: str = _field("127.0.0.1:9466", "address", "the reassignment sink's /metrics and /healthz")
    assigner_metrics_addr: str = _field("127.0.0.1:9467", "address", "the reference assigner's /metrics and /healthz")
    alertmanager_url: str | None = _field(
        None, "urls", "Alertmanager members (each gets every alert); unset: `hbreg up` starts one"
    )
    cluster: str = _field("local", "text", "the `cluster` label of every alert")
    public_url: str | None = _field(
        None, "text", "where people reach the dashboard (alerts link to it); unset: the query API"
    )
    alert_resend: float = _field(60.0, "seconds", "firing alerts are sent again this often (endsAt = 4 x this ahead)")
    orphan_alert: float = _field(60.0, "seconds", "a task without an owner this long raises TaskOrphaned")
    alerts_metrics_addr: str = _field("127.0.0.1:9468", "address", "the Alertmanager sink's /metrics and /healthz")
    relay: str | None = _field(None, "local", "the host relay agents beat through; unset: straight to the ingest")
    relay_addr: str = _field("127.0.0.1:50052", "local", "where `hbreg relay` serves the agents of its host")
    relay_token: str | None = _field(None, "text", "the relay token `hbreg relay` sends to the ingest")
    relay_flush: float = _field(0.005, "seconds", "`hbreg relay` sends what arrived in this long as one BeatBatch")
    relay_tls_ca: pathlib.Path | None = _field(None, "file", "CA of the ingest's certificate: `hbreg relay` uses TLS")
    relay_tls_cert: pathlib.Path | None = _field(None, "file", "`hbreg relay`'s client certificate (mutual TLS)")
    relay_tls_key: pathlib.Path | None = _field(None, "file", "private key of HBREG_RELAY_TLS_CERT (PEM)")
    relay_metrics_addr: str = _field("127.0.0.1:9469", "address", "the relay's /metrics and /healthz")
    allow_untested_versions: bool = _field(
        False, "switch", "let the worker start on faust-streaming/aiokafka versions its hooks were not verified on"
    )

    def __post_init__(self) -> None:
        # a topic whose min.insync.replicas exceeds its replicas refuses every acks=all write
        if self.kafka_min_insync_replicas > self.kafka_replication_factor:
            raise ConfigError(
                f"HBREG_KAFKA_MIN_INSYNC_REPLICAS={self.kafka_min_insync_replicas} exceeds "
                f"HBREG_KAFKA_REPLICATION_FACTOR={self.kafka_replication_factor}: no write could ever succeed"
            )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        use_state: bool = True,
        **overrides: Any,
    ) -> Settings:
        """Parse the environment; CLI flags come in as `overrides` (None means 'not given')."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            var = PREFIX + field.name.upper()
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[field.name] = parse_field(field.name, raw, var)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if use_state:
            settings = settings.with_state_file()
        return settings

    def with_state_file(self) -> Settings:
        """Fill unset service addresses from what a running `hbreg up` recorded."""
        from heartbeat_registry.core import state

        recorded = state.read(self.state_dir)
        if not recorded:
            return self
        fill: dict[str, Any] = {
            name: recorded[name]
            for name in ("redis_url", "kafka_bootstrap", "alertmanager_url")
            if getattr(self, name) is None and recorded.get(name)
        }
        # the addresses `hbreg up` served on, unless this process was told otherwise
        for name in ("grpc_addr", "http_addr"):
            if recorded.get(name) and getattr(self, name) == _DEFAULTS[name]:
                fill[name] = recorded[name]
        if recorded.get("redis_cluster") and "redis_url" in fill:  # the recorded URL is a cluster's seed
            fill["redis_cluster"] = True
        if self.auth_secret is None and self.auth_secret_file is None and recorded.get("auth_secret_file"):
            fill["auth_secret_file"] = pathlib.Path(recorded["auth_secret_file"])
        return dataclasses.replace(self, **fill) if fill else self

    def require(self, *names: str) -> None:
        """Fail with one clear line when a service address is neither configured nor recorded."""
        for name in names:
            if getattr(self, name) is None:
                raise ConfigError(
                    f"{PREFIX}{name.upper()} is not set and no running `hbreg up` was found "
                    f"(state file {self.state_dir / 'state.json'})"
                )

    def signing_secret(self, kept_by_up: bool = False) -> bytes | None:
        """The token signing secret, from HBREG_AUTH_SECRET or the file HBREG_AUTH_SECRET_FILE names; with
        `kept_by_up` (the tools that mint tokens, never a service), else the one `hbreg up` keeps in the
        state directory, also while it is stopped: tokens minted then stay valid for its next start."""
        from heartbeat_registry.core import state

        kept = state.secret_path(self.state_dir)
        if self.auth_secret:
            secret, source = self.auth_secret.encode(), "HBREG_AUTH_SECRET"
        elif self.auth_secret_file:
            secret, source = (
                self.auth_secret_file.read_bytes().strip(),
                f"HBREG_AUTH_SECRET_FILE={self.auth_secret_file}",
            )
        elif kept_by_up and kept.is_file():
            secret, source = kept.read_bytes().strip(), str(kept)
        else:
            return None
        if len(secret) < 32:  # RFC 7518 3.2: an HS256 key is at least as long as the hash
            raise ConfigError(f"{source}: expected a secret of at least 32 bytes")
        return secret

    def child_env(self) -> dict[str, str]:
        """The settings as environment variables, for the processes `hbreg up` starts."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                out[PREFIX + field.name.upper()] = ",".join(value) or "none"
            elif value is not None:
                out[PREFIX + field.name.upper()] = str(value)
        return out


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}


def parse_field(name: str, raw: str, label: str | None = None) -> Any:
    """One setting's value from text, as its variable would give it; a ConfigError naming `label` (default:
    the setting's name) and what was expected."""
    field = next((f for f in dataclasses.fields(Settings) if f.name == name), None)
    if field is None:
        raise ConfigError(f"{label or name}: no such setting")
    parse, expects = PARSERS[field.metadata["kind"]]
    try:
        return parse(raw.strip())
    except (ValueError, TypeError):
        raise ConfigError(f"{label or name}={raw!r}: expected {expects}") from None


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the README table is checked against this."""
    rows = []
    for field in dataclasses.fields(Settings):
        default = field.default
        shown = "(unset)" if default is None else str(default)
        if field.name == "state_dir":
            shown = "$XDG_STATE_HOME/hbreg or ~/.local/state/hbreg"
        rows.append((PREFIX + field.name.upper(), shown, field.metadata["doc"]))
    return rows
