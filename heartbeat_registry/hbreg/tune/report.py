"""`hbreg tune --report FILE.html`: one self-contained page (nothing fetched: uPlot and the data are
inlined) with the trade-off chart, false stalls against the p99 detection delay, one point per parameter
set with the live one marked, and the table. `hbreg tune` also keeps the latest in Redis, where the query API
serves it at `/reports/tune` (the dashboard's header links it)."""

from __future__ import annotations

import html
import json
import pathlib
import time
from typing import Any

UPLOT = pathlib.Path(__file__).resolve().parents[3] / "sinks" / "web" / "static" / "vendor" / "uplot"

FIGURES = ("stalls", "false_stalls", "true_stalls", "unlabelled", "unresolved", "delay_p50_ms", "delay_p99_ms")

SCRIPT = """
const data = JSON.parse(document.getElementById("tune-data").textContent);
const points = data.results.filter((r) => r.delay_p99_ms !== null)
  .sort((a, b) => a.delay_p99_ms - b.delay_p99_ms || a.false_stalls - b.false_stalls);
const xs = points.map((r) => r.delay_p99_ms / 1000);
const grid = points.map((r) => (r.live ? null : r.false_stalls));
const live = points.map((r) => (r.live ? r.false_stalls : null));
const hover = document.getElementById("hover");
const describe = (r) => Object.entries(r.params).map(([k, v]) => `${k}=${v}`).join(" ") || "live settings";
new uPlot({
  width: Math.min(900, document.body.clientWidth - 40), height: 360,
  scales: { x: { time: false }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
  axes: [{ label: "p99 detection delay of true stalls (s)" }, { label: "false stalls" }],
  series: [{ label: "delay p99 (s)" },
    { label: "parameter set", stroke: "#1d4f91", paths: () => null, points: { show: true, size: 9, fill: "#1d4f91" } },
    { label: "live settings", stroke: "#b3261e", paths: () => null,
      points: { show: true, size: 13, fill: "#b3261e" } }],
  hooks: { setCursor: [(u) => {
    const i = u.cursor.idx;
    hover.textContent = i === null || i === undefined ? "" : `${describe(points[i])}: ${points[i].false_stalls} false, `
      + `${points[i].true_stalls} true, p99 ${points[i].delay_p99_ms} ms`;
  }] },
}, [xs, grid, live], document.getElementById("chart"));
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 20px; color: #1b1f24; }
table { border-collapse: collapse; margin-top: 12px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #d8dee4; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.live { background: #fde8e7; font-weight: 600; }
.ok { color: #1a7f37; } .bad { color: #b3261e; }
#hover { min-height: 1.4em; color: #57606a; }
"""


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def _untimed(result: dict[str, Any]) -> str:
    count = sum(1 for r in result["results"] if r["delay_p99_ms"] is None)
    if not count:
        return ""
    return f"<p>{count} parameter set(s) had no true stall to time, so they are in the table only.</p>"


def render(result: dict[str, Any]) -> str:
    period = result["period"]
    live = result["live"]
    names = list(live["params"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for r in result["results"]:
        cells = "".join(f"<td>{html.escape(str(r['params'].get(n, '')))}</td>" for n in names)
        figures = "".join(f"<td>{'' if r[k] is None else r[k]}</td>" for k in FIGURES)
        mark = "live" if r["live"] else ""
        rows.append(f'<tr class="{mark}"><td>{mark}</td>{cells}{figures}</tr>')
    fidelity = (
        '<span class="ok">reproduces the workers\' stall events exactly</span>'
        if live["matches_live_events"]
        else f'<span class="bad">{len(live["differences"])} differences from the workers\' stall events</span>'
    )
    data = json.dumps(result).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hbreg tune</title>
<style>{(UPLOT / "uPlot.min.css").read_text()}{STYLE}</style></head>
<body>
<h1>Detection tuning</h1>
<p>{result["heartbeats"]:,} heartbeats of {result["agents"]:,} agents, from {_utc(period["from_ms"])} to
{_utc(period["to_ms"])} ({period["warmup_s"]:g} s of warm-up before it), read from {html.escape(period["source"])}.
The live settings' replay {fidelity}.</p>
<p>Each point is one parameter set: how many stalls it would have raised that were false (the agent's next
heartbeat continued its own count: it was late, not dead), against how long it took to notice the true
ones (p99). Lower left is better; the red point is what runs now.</p>
<div id="chart"></div><div id="hover"></div>{_untimed(result)}
<table class="sets"><tr><th></th>{head}<th>stalls</th><th>false</th><th>true</th><th>unlabelled</th><th>unresolved</th>
<th>delay p50 ms</th><th>delay p99 ms</th></tr>
{"".join(rows)}
</table>
<script type="application/json" id="tune-data">{data}</script>
<script>{(UPLOT / "uPlot.iife.min.js").read_text()}</script>
<script>{SCRIPT}</script>
</body></html>
"""
