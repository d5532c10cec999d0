"""Regenerate the committed Python modules from the .proto contract (`make proto`).

`python proto/generate.py OUT_DIR` writes into OUT_DIR instead; the freshness test uses that to compare
a fresh generation with what is committed.
"""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "heartbeat_registry" / "pb"
PACKAGE = "heartbeat_registry.pb"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc and point the generated imports at our package, not a top-level `heartbeat`."""
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out.rglob("*.py*") if p.suffix in (".py", ".pyi") and "_pb2" in p.name)
    for path in written:
        text = path.read_text()
        text = re.sub(r"^from heartbeat\.", f"from {PACKAGE}.heartbeat.", text, flags=re.M)
        path.write_text(text)
    for package_dir in {p.parent for p in written} | {p.parent.parent for p in written}:
        if package_dir != out.parent:
            (package_dir / "__init__.py").touch()
    return written


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(target):
        print(path.relative_to(target))
