"""The .proto is the contract: generated code must match it, and the seed's fields never move."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

from heartbeat_registry.pb import hb

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True, capture_output=True
    )
    committed = ROOT / "heartbeat_registry" / "pb"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "protoc generated nothing"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, committed / p, shallow=False)]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_seed_fields_keep_their_numbers() -> None:
    fields = {f.name: (f.number, f.type) for f in hb.Heartbeat.DESCRIPTOR.fields}
    F = hb.Heartbeat.DESCRIPTOR.fields_by_name["agent_id"]
    assert fields["agent_id"] == (1, F.TYPE_STRING)
    assert fields["task_id"] == (2, F.TYPE_STRING)
    assert fields["status"] == (3, F.TYPE_ENUM)
    assert fields["timestamp"] == (4, F.TYPE_INT64)
    assert fields["cpu_util"] == (5, F.TYPE_FLOAT)
    assert all(
        number >= 6
        for name, (number, _) in fields.items()
        if name not in {"agent_id", "task_id", "status", "timestamp", "cpu_util"}
    )
    assert dict(hb.Status.items()) == {
        "STATUS_UNSPECIFIED": 0,
        "IDLE": 1,
        "RUNNING": 2,
        "COMPLETED": 3,
        "FAILED": 4,
        "STOPPING": 5,
    }


def test_service_has_the_three_rpcs() -> None:
    service = hb.DESCRIPTOR.services_by_name["HeartbeatService"]
    assert service.full_name == "heartbeat.v1.HeartbeatService"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Beat": (False, False), "BeatBatch": (False, False), "BeatStream": (True, True)}


def test_concatenated_columns_merge() -> None:
    """The bridge forwards stream entries by concatenation; protobuf must merge them into one batch."""
    a = hb.HeartbeatColumns(agent_id=["a"], received_ms=[1], watermark_ms=5).SerializeToString()
    b = hb.HeartbeatColumns(agent_id=["b"], received_ms=[2]).SerializeToString()
    tick = hb.HeartbeatColumns(watermark_ms=9).SerializeToString()
    merged = hb.HeartbeatColumns.FromString(a + b + tick)
    assert list(merged.agent_id) == ["a", "b"]
    assert list(merged.received_ms) == [1, 2]
    assert merged.watermark_ms == 9
