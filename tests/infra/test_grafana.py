"""infra/grafana/heartbeat-registry.json: a well-formed dashboard whose queries promtool accepts. That every
metric it queries is one the processes export is checked against the running system in
tests/core/test_up.py (`exported_metrics` below, over every process of `hbreg up`)."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import urllib.request

from tests.conftest import require_binary

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "infra" / "grafana" / "heartbeat-registry.json"
METRIC = re.compile(r"\bhbreg_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def queried_metrics() -> set[str]:
    return {name for expr in queries() for name in METRIC.findall(expr)}


def exported_metrics(addresses: list[str]) -> set[str]:
    """Every sample name the `/metrics` pages at `addresses` declare (`# TYPE` lines, with their suffixes)."""
    names = set()
    for addr in addresses:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("# TYPE "):
                    _, _, name, kind = line.split()
                    names.add(name)
                    names.update(name + suffix for suffix in SUFFIXES.get(kind, ()))
    return names


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert [i["name"] for i in dashboard["templating"]["list"]] == ["datasource"]
    charts = [p for p in panels if p["type"] != "row"]
    assert len(charts) >= 15
    for panel in charts:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    assert len(queried_metrics()) >= 25


def test_every_query_is_valid_promql(tmp_path) -> None:
    require_binary(shutil.which("promtool") is not None, "promtool (Debian's prometheus; make install)")
    rules = {
        "groups": [
            {"name": "grafana", "rules": [{"record": f"grafana:query_{i}", "expr": e} for i, e in enumerate(queries())]}
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    checked = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(queries())} rules found" in checked.stdout, checked.stdout
