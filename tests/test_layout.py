"""The walls of docs/architecture.md: who may import whom, and an agent's install without the server stack."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVER_STACK = ("faust", "mode", "aiokafka", "redis", "aiohttp", "prometheus_client", "jwt", "orjson", "uvloop")


def imports(path: pathlib.Path) -> set[str]:
    """The modules `path` imports, relative imports made absolute."""
    package = list(path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.add(".".join([*base, *([node.module] if node.module else [])]))
    return found


def modules(folder: str, *, top_level_only: bool = False) -> list[pathlib.Path]:
    base = ROOT / folder
    files = base.glob("*.py") if top_level_only else base.rglob("*.py")
    return [p for p in files if "pb" not in p.relative_to(ROOT).parts]


def offenders(files: list[pathlib.Path], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def test_the_agent_package_imports_only_itself() -> None:
    forbidden = ("heartbeat_registry.core", "heartbeat_registry.hbreg", "ingest", "processors", "sinks", *SERVER_STACK)
    # __main__ is `python -m heartbeat_registry`, i.e. `hbreg`: run, never imported
    files = [p for p in modules("heartbeat_registry", top_level_only=True) if p.name != "__main__.py"]
    assert offenders(files, forbidden) == []


def test_the_core_imports_no_service_and_no_tool() -> None:
    assert (
        offenders(modules("heartbeat_registry/core"), ("heartbeat_registry.hbreg", "ingest", "processors", "sinks"))
        == []
    )


def test_services_import_each_other_never() -> None:
    for folder, others in (
        ("ingest", ("processors", "sinks", "heartbeat_registry.hbreg")),
        ("processors", ("ingest", "sinks", "heartbeat_registry.hbreg")),
        ("sinks", ("ingest", "processors", "heartbeat_registry.hbreg")),
    ):
        assert offenders(modules(folder), others) == [], folder


def test_the_client_surface_loads_without_the_server_stack() -> None:
    """As in an agent's environment without the [server] extra: the server packages cannot even be imported."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_STACK!r}:
            raise ImportError(f"{{name}} is not installed (agent environment)")
sys.meta_path.insert(0, Block())
from heartbeat_registry import AsyncHeartbeatClient, HeartbeatClient, TaskAbandoned, TlsConfig, HeartbeatRejected
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_STACK!r})
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
