"""What `hbreg` prints for people: the tables of agents, windows and benchmark results (with `--json`
the commands print the API's objects instead, one per line)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from heartbeat_registry.beats import now_ms


def agents(rows: Iterable[Mapping[str, Any]]) -> str:
    lines = [f"{'AGENT':<24} {'STATE':<10} {'STATUS':<10} {'TASK':<28} {'CPU':>5} {'PHI':>7} {'SILENT':>8}"]
    now = now_ms()
    for a in rows:
        silent = f"{(now - a['last_seen_ms']) / 1000:.1f}s" if a["last_seen_ms"] else "-"
        lines.append(
            f"{a['agent_id']:<24} {a['state']:<10} {a['status']:<10} {a['task_id'] or '-':<28} "
            f"{a['cpu_util']:>5.2f} {a['phi']:>7.2f} {silent:>8}"
        )
    return "\n".join(lines)


def windows(rows: Iterable[Mapping[str, Any]]) -> str:
    lines = [
        f"{'WINDOW START':<20} {'BEATS':>5} {'GAP ms':>7} {'CPU mean':>8} {'min':>5} {'max':>5} {'p95':>5} "
        f"{'slope/min':>9} {'STATE':<10}"
    ]
    for r in rows:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["window_start_ms"] / 1000))
        lines.append(
            f"{start:<20} {r['beats']:>5} {r['longest_gap_ms']:>7} {r['cpu_mean']:>8.3f} {r['cpu_min']:>5.2f} "
            f"{r['cpu_max']:>5.2f} {r['cpu_p95']:>5.2f} {r['cpu_slope_per_min']:>9.3f} {(r['state'] or 'open'):<10}"
        )
    return "\n".join(lines)


def bench(results: Mapping[str, Any]) -> str:
    lines = []
    for name, value in results.items():
        if isinstance(value, dict) and name != "machine":
            figures = "  ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"{name:<10} {figures}")
        else:
            lines.append(f"{name:<10} {value}")
    return "\n".join(lines)


def tasks(rows: Iterable[Mapping[str, Any]]) -> str:
    lines = [f"{'TASK':<32} {'STATE':<9} {'OWNER':<24} {'EPOCH':>5} {'SINCE':>8}"]
    now = now_ms()
    for t in rows:
        lines.append(
            f"{t['task_id']:<32} {t['state']:<9} {t['owner'] or '-':<24} {t['epoch']:>5} "
            f"{(now - t['since_ms']) / 1000:>7.1f}s"
        )
    return "\n".join(lines)


def task(t: Mapping[str, Any]) -> str:
    lines = [f"task {t['task_id']}: {t['state']}, owner {t['owner'] or '-'}, epoch {t['epoch']}", ""]
    lines.append(f"{'WHEN':<20} {'EPOCH':>5} {'WHAT':<20} {'AGENT':<24} WHY")
    for c in t["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["at_ms"] / 1000))
        lines.append(f"{when:<20} {c['epoch']:>5} {c['what']:<20} {c['agent']:<24} {c['why']}")
    return "\n".join(lines)


def alerts(found: Mapping[str, Any]) -> str:
    lines = [f"{'FIRING':<20} {'SINCE':<20} LABELS"]
    for a in found["firing"]:
        labels = dict(a.get("labels", {}))
        name = labels.pop("alertname", "?")
        state = a.get("status", {}).get("state", "")
        shown = " ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        lines.append(
            f"{name:<20} {a.get('startsAt', '')[:19]:<20} {shown}" + (f" ({state})" if state != "active" else "")
        )
    lines += ["", f"{'NOTIFIED':<20} {'STATUS':<9} {'ALERTS':>6} GROUP"]
    for n in found["notifications"]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(n.get("received_ms", 0) / 1000))
        group = " ".join(f"{k}={v}" for k, v in sorted(n.get("groupLabels", {}).items()))
        lines.append(f"{at:<20} {n.get('status', ''):<9} {len(n.get('alerts', [])):>6} {group}")
    return "\n".join(lines)


def tune(result: Mapping[str, Any]) -> str:
    live = result["live"]
    names = list(live["params"])
    fidelity = (
        "reproduces the workers' stall events"
        if live["matches_live_events"]
        else (f"{len(live['differences'])} differences from the workers' {live['live_events']} stall events")
    )
    lines = [
        f"{result['heartbeats']:,} heartbeats of {result['agents']:,} agents; live settings: {fidelity}",
        "  ".join(
            [
                f"{'':<4}",
                *(f"{n:>14}" for n in names),
                f"{'STALLS':>7} {'FALSE':>6} {'TRUE':>6} {'UNLAB':>6} {'UNRES':>6} {'p50 ms':>8} {'p99 ms':>8}",
            ]
        ),
    ]
    for r in result["results"]:
        values = [f"{r['params'][n]!s:>14}" for n in names]
        p50 = "-" if r["delay_p50_ms"] is None else r["delay_p50_ms"]
        p99 = "-" if r["delay_p99_ms"] is None else r["delay_p99_ms"]
        lines.append(
            "  ".join(
                [
                    f"{'live' if r['live'] else '':<4}",
                    *values,
                    f"{r['stalls']:>7} {r['false_stalls']:>6} "
                    f"{r['true_stalls']:>6} {r['unlabelled']:>6} {r['unresolved']:>6} {p50:>8} {p99:>8}",
                ]
            )
        )
    return "\n".join(lines)
