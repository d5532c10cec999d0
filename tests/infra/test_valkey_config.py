"""infra/valkey/valkey.conf: the embedded valkey-server loads it, every directive in it is in effect, `hbreg up`
with HBREG_REDIS_DURABLE=on runs exactly it, and at its memory limit the ingest refuses heartbeats instead of
losing them."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shlex
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from heartbeat_registry.beats import heartbeat
from heartbeat_registry.core.names import Names
from heartbeat_registry.hbreg import services
from heartbeat_registry.pb import hb, hb_grpc
from ingest.server import Ingest
from tests import procs
from tests.conftest import make_settings

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "infra" / "valkey" / "valkey.conf"
# what `hbreg up` sets on the command line instead (where it listens, keeps its files and logs)
LOCAL = {"port", "bind", "dir", "loglevel", "logfile"}


def directives() -> dict[str, str]:
    """The directives the file sets (not the commented ones), as valkey reads them."""
    out = {}
    for line in CONFIG.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, *values = shlex.split(line)
            out[name.lower()] = " ".join(values)
    return out


def effective(value: str) -> str:
    """A directive's value as CONFIG GET reports it (memory sizes in bytes; `bind * -::*` as given)."""
    number = value.lower()
    for unit in ("kb", "mb", "gb"):  # valkey counts these in powers of 1024 (k, m, g in powers of 1000)
        if number.endswith(unit) and number[: -len(unit)].isdigit():
            return str(int(number[: -len(unit)]) * 1024 ** ("kmg".index(unit[0]) + 1))
    return value


@contextlib.contextmanager
def durable_valkey(data: pathlib.Path) -> Iterator[tuple[redis.Redis, list[str]]]:
    """valkey-server as `hbreg up` starts it with HBREG_REDIS_DURABLE=on: a client and the command line."""
    port = services.free_port()
    command = services.valkey_command(port, data, durable=True)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        services.wait_port("127.0.0.1", port, 15, "valkey")
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            yield client, command
        finally:
            client.close()
    finally:
        procs.stop(proc)


def test_durable_valkey_runs_the_file_and_every_directive_is_in_effect(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "valkey"
    with durable_valkey(data) as (client, command):
        assert command[1] == str(CONFIG)  # `hbreg up` with HBREG_REDIS_DURABLE=on runs the file itself
        overridden = {arg[2:] for arg in command[2:] if arg.startswith("--")}
        assert overridden == LOCAL
        wanted = directives()
        # what the issue asks of the file, explicitly
        assert wanted["maxmemory-policy"] == "noeviction"
        assert wanted["appendonly"] == "yes" and wanted["appendfsync"] == "always"
        assert wanted["no-appendfsync-on-rewrite"] == "no"
        assert {"stream-node-max-bytes", "stream-node-max-entries"} <= set(wanted)
        for name, value in wanted.items():
            if name in LOCAL:
                continue
            got = client.config_get(name)
            assert got == {name: effective(value)}, name
        # the local overrides took, the production ones stayed behind
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("dir") == {"dir": str(data)}
        assert client.config_get("cluster-enabled") == {"cluster-enabled": "no"}
        client.xadd("probe", {"x": "1"})
        assert client.info("persistence")["aof_enabled"] == 1
    assert (data / wanted["appenddirname"]).is_dir()  # the append-only file is where `hbreg up` keeps data


def test_in_memory_valkey_is_left_as_it_was(tmp_path: pathlib.Path) -> None:
    """The control: without durability nothing of the file is used (no AOF, no memory limit)."""
    command = services.valkey_command(services.free_port(), tmp_path, durable=False)
    assert str(CONFIG) not in command
    assert command[command.index("--appendonly") + 1] == "no"


async def test_at_the_memory_limit_the_ingest_refuses_and_loses_nothing(tmp_path: pathlib.Path) -> None:
    """noeviction: past maxmemory Valkey refuses the ingest's write script, the agent gets UNAVAILABLE
    (never an acknowledgement for a heartbeat that is not stored), nothing already stored is evicted, and
    the ingest takes heartbeats again as soon as there is room."""
    with durable_valkey(tmp_path / "valkey") as (client, _):
        port = client.connection_pool.connection_kwargs["port"]
        settings = make_settings(tmp_path, "oom", redis_url=f"redis://127.0.0.1:{port}")
        names = Names.of(settings)
        node = Ingest(settings)
        await node.start()
        try:
            async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
                stub = hb_grpc.HeartbeatServiceStub(channel)
                await stub.Beat(heartbeat("agent-1", "job-1", cpu=0.5, seq=1), timeout=5)  # room: stored
                assert stored(client, names) == [("agent-1", 1)]

                client.config_set("maxmemory", 1)  # far below what is used: every write is refused
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Beat(heartbeat("agent-2", "job-2", cpu=0.5, seq=1), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "used memory > 'maxmemory'" in (refused.value.details() or "")
                assert stored(client, names) == [("agent-1", 1)]  # nothing evicted, nothing half-written

                client.config_set("maxmemory", "4gb")
                deadline = time.monotonic() + 5
                while True:  # the ingest's Redis watch lets writes through again within a fraction of a second
                    try:
                        await stub.Beat(heartbeat("agent-2", "job-2", cpu=0.5, seq=2), timeout=5)
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        assert time.monotonic() < deadline, "the ingest did not take heartbeats again"
                        await asyncio.sleep(0.1)
                assert sorted(stored(client, names)) == [("agent-1", 1), ("agent-2", 2)]
        finally:
            await node.stop(grace=1.0)


def stored(client: redis.Redis, names: Names) -> list[tuple[str, int]]:
    """(agent, seq) of every heartbeat in the shard streams."""
    raw = redis.Redis(host="127.0.0.1", port=client.connection_pool.connection_kwargs["port"])
    try:
        out = []
        for stream in names.streams():
            for _, fields in raw.xrange(stream):
                cols = hb.HeartbeatColumns.FromString(fields[b"b"])
                out += list(zip(cols.agent_id, cols.seq, strict=True))
        return out
    finally:
        raw.close()
