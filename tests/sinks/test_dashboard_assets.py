"""The dashboard's files as served: every import and link resolves to a committed file (no build step, no
CDN: the page works offline), and the vendored libraries are the versions `make vendor` fetches."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
STATIC = ROOT / "sinks" / "web" / "static"
REFERENCE = re.compile(r"""(?:from\s+|import\s*\(\s*)["']([^"']+)["']|(?:src|href)=["']([^"']+)["']""")


def references(path: pathlib.Path) -> list[str]:
    return [a or b for a, b in REFERENCE.findall(path.read_text())]


def test_every_import_and_link_is_a_committed_file() -> None:
    missing, remote = [], []
    for path in [*STATIC.rglob("*.js"), STATIC / "index.html"]:
        for ref in references(path):
            if re.match(r"^(https?:)?//", ref):
                remote.append(f"{path.relative_to(STATIC)}: {ref}")
            elif ref.startswith("/static/"):
                missing += [] if (STATIC / ref.removeprefix("/static/")).is_file() else [ref]
            elif ref.startswith("."):
                target = (path.parent / ref).resolve()
                missing += [] if target.is_file() else [f"{path.relative_to(STATIC)}: {ref}"]
    assert remote == [], "fetched from elsewhere at run time"
    assert missing == []
    assert len(references(STATIC / "index.html")) >= 3  # the check above did look at something


def test_no_inline_script_or_style_the_csp_would_block() -> None:
    page = (STATIC / "index.html").read_text()
    assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page) is None
    assert "<style" not in page and " style=" not in page
    assert re.search(r"\son[a-z]+=", page) is None  # no inline event handlers either


def test_the_vendored_versions_are_the_ones_make_vendor_fetches() -> None:
    makefile = (ROOT / "Makefile").read_text()
    wanted = dict(re.findall(r"^(UPLOT|VIRTUAL_CORE|AXE)_VERSION := (\S+)$", makefile, re.M))
    assert set(wanted) == {"UPLOT", "VIRTUAL_CORE", "AXE"}
    notes = (STATIC / "vendor" / "VENDOR.md").read_text()
    assert all(re.search(rf"\b{re.escape(v)}\b", notes) for v in wanted.values()), wanted
    assert f"(v{wanted['UPLOT']})" in (STATIC / "vendor" / "uplot" / "uPlot.esm.js").read_text()[:400]
    assert f"axe v{wanted['AXE']}" in (ROOT / "tests" / "browser" / "vendor" / "axe.min.js").read_text()[:200]
    assert "process.env" not in "".join(p.read_text() for p in (STATIC / "vendor" / "virtual-core").glob("*.js"))
