"""The configuration files in infra/ pass their own tools: amtool for Alertmanager's, promtool for the
Prometheus rules (with their unit tests) and scrape configuration."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

from tests.conftest import require_binary

INFRA = pathlib.Path(__file__).resolve().parents[2] / "infra"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=INFRA / "prometheus")


def test_alertmanager_config_passes_amtool() -> None:
    require_binary(shutil.which("amtool") is not None, "amtool (Debian's prometheus-alertmanager; make install)")
    result = run("amtool", "check-config", str(INFRA / "alertmanager" / "alertmanager.yml"))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    assert "2 inhibit rules" in result.stdout, result.stdout


def test_prometheus_rules_pass_their_unit_tests() -> None:
    require_binary(shutil.which("promtool") is not None, "promtool (Debian's prometheus; make install)")
    checked = run("promtool", "check", "rules", "rules.yml")
    assert checked.returncode == 0 and "7 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = run("promtool", "test", "rules", "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = run("promtool", "check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
