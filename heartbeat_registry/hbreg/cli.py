"""`hbreg`: the command line. It parses arguments and hands each command to the module that does it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence

from heartbeat_registry import __version__
from heartbeat_registry.core.settings import PARSERS, Settings
from heartbeat_registry.errors import ConfigError, HeartbeatRegistryError

SERVER_EXTRA = "pip install 'heartbeat-registry[server]'"

STATUSES = ("IDLE", "RUNNING", "COMPLETED", "FAILED", "STOPPING")


def _arg(kind: str) -> Callable[[str], object]:
    """An argparse type from the settings parser of that kind, so flags and variables agree."""
    parse, expects = PARSERS[kind]

    def convert(text: str) -> object:
        try:
            return parse(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {expects}, got {text!r}") from None

    convert.__name__ = kind
    return convert


def _settings(args: argparse.Namespace, *, use_state: bool = True) -> Settings:
    return Settings.from_env(
        use_state=use_state,
        grpc_addr=getattr(args, "grpc_addr", None),
        redis_url=getattr(args, "redis_url", None),
        kafka_bootstrap=getattr(args, "kafka_bootstrap", None),
        http_addr=getattr(args, "http_addr", None),
    )


def _print_lines(objects: Sequence[object]) -> None:
    for item in objects:
        print(json.dumps(item))


# commands: each only builds the settings and calls one module ----------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from heartbeat_registry.core.logs import setup_logging
    from heartbeat_registry.hbreg import up

    settings = _settings(args, use_state=False)
    setup_logging("up", settings.log_level)
    replicas = up.parse_replicas(args.replicas) if args.replicas else None
    return asyncio.run(up.up(settings, demo=args.demo, demo_stall_fraction=args.demo_stall_fraction, replicas=replicas))


def cmd_simulate(args: argparse.Namespace) -> int:
    from heartbeat_registry.hbreg.simulate import run_demo
    from heartbeat_registry.hbreg.tokens import fleet_tokens

    settings = _settings(args)
    token_for = fleet_tokens(settings)
    print(
        f"simulating {args.agents} agents against {settings.grpc_addr}, one beat every {args.interval} s"
        f" ({round(args.agents * args.stall_fraction)} of them stall now and then)",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            run_demo(
                settings.grpc_addr,
                args.agents,
                args.interval,
                args.stall_fraction,
                settings.stall_timeout,
                prefix=args.prefix,
                seed=args.seed,
                token_for=token_for,
            )
        )
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from heartbeat_registry.core.tokens import AGENT, ASSIGNER
    from heartbeat_registry.hbreg.tokens import agent_token

    role = ASSIGNER if args.assigner else AGENT
    print(agent_token(_settings(args), args.agent, args.ttl, args.relay_for, role))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from heartbeat_registry.hbreg.send import send

    return send(_settings(args), args.agent, args.task, args.status, args.cpu, args.progress, args.token, args.timeout)


def cmd_events(args: argparse.Namespace) -> int:
    from heartbeat_registry.hbreg.events import print_events

    settings = _settings(args)
    settings.require("kafka_bootstrap")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(print_events(settings, follow=args.follow, as_json=args.json))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from heartbeat_registry.core.lifecycle import exit_on_sigterm
    from heartbeat_registry.hbreg import tables

    exit_on_sigterm()
    duration = args.duration or {"ingest": 10.0, "pipeline": 20.0, "detection": 60.0}.get(args.suite, 0.0)
    if args.suite == "ingest":
        from heartbeat_registry.hbreg.bench import ingest

        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = sorted(set(modes) - set(ingest.MODES))
        if unknown:
            raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(ingest.MODES)}")
        results = ingest.run(modes, duration, args.redis_url, args.grpc_addr)
    elif args.suite == "pipeline":
        from heartbeat_registry.hbreg.bench import pipeline

        results = pipeline.run(args.heartbeats, duration, args.redis_url, args.kafka_bootstrap)
    elif args.suite == "detection":
        from heartbeat_registry.hbreg.bench import detection

        results = detection.run(args.agents or 1000, duration, args.redis_url, args.kafka_bootstrap)
    elif args.suite == "recovery":
        from heartbeat_registry.hbreg.bench import recovery

        results = recovery.run(args.stalls, args.kills or 40, args.redis_url, args.kafka_bootstrap)
    elif args.suite == "scale":
        from heartbeat_registry.hbreg.bench import scale

        results = scale.run(args.agents or 100_000, args.interval, duration or 600.0, args.relays, args.kills or 100)
    elif args.suite == "tune":
        from heartbeat_registry.hbreg.bench import tune

        results = tune.run(args.heartbeats, args.redis_url, args.kafka_bootstrap)
    else:
        from heartbeat_registry.hbreg.bench import dashboard

        results = dashboard.run(args.agents or 10_000, args.changes, args.redis_url, args.kafka_bootstrap)
    print(json.dumps(results) if args.json else tables.bench(results))
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from heartbeat_registry.core.lifecycle import exit_on_sigterm
    from heartbeat_registry.hbreg.chaos import run

    exit_on_sigterm()
    result = run.run(args.duration, args.agents, args.seed, args.keep)
    print(json.dumps(result) if args.json else run.text(result))
    return 0 if not result["failed_goals"] else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from heartbeat_registry.beats import now_ms
    from heartbeat_registry.hbreg import tables
    from heartbeat_registry.hbreg.tune import report, run

    settings = _settings(args)
    now = now_ms()
    if args.to_ms is not None and args.from_ms is None:
        raise ConfigError("--to needs --from (or use --since)")
    # without --to the period ends --label-grace ago: every stall's agent had that long to come back
    end = args.to_ms if args.to_ms is not None else now - int(args.label_grace * 1000)
    start = args.from_ms if args.from_ms is not None else end - int(args.since * 1000)
    period = run.Period(start, end, int(args.warmup * 1000), int(args.label_grace * 1000))
    result = run.tune(settings, period, args.grid or [], args.source, args.processes)
    page = report.render(result)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as out:
            out.write(page)
    if settings.redis_url:
        run.keep_report(settings, page)
    print(json.dumps(result) if args.json else tables.tune(result))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from heartbeat_registry.core import lifecycle

    settings = _settings(args)
    if settings.ingest_processes > 1:
        from ingest import processes

        return lifecycle.run("ingest", settings, processes.serve, uvloop=True)
    from ingest.server import serve

    return lifecycle.run("ingest", settings, functools.partial(serve, ops=not args.no_ops), uvloop=False)


def cmd_bridge(args: argparse.Namespace) -> int:
    from heartbeat_registry.core import lifecycle
    from processors.bridge import serve

    return lifecycle.run("bridge", _settings(args), lambda s: serve(s, args.name), uvloop=True)


def cmd_worker(args: argparse.Namespace) -> int:
    from processors.worker import run

    return run(_settings(args))


def cmd_query(args: argparse.Namespace) -> int:
    from heartbeat_registry.core import lifecycle
    from sinks.web.server import serve

    return lifecycle.run("query", _settings(args), serve, uvloop=True)


def cmd_reassign(args: argparse.Namespace) -> int:
    from heartbeat_registry.core import lifecycle
    from sinks.reassign import serve

    return lifecycle.run("reassign", _settings(args), serve, uvloop=True)


def cmd_assigner(args: argparse.Namespace) -> int:
    from heartbeat_registry.core import lifecycle
    from sinks.assigner import serve

    return lifecycle.run("assigner", _settings(args), serve, uvloop=True)


def cmd_alerter(args: argparse.Namespace) -> int:
    from heartbeat_registry.core import lifecycle
    from sinks.alertmanager import serve

    return lifecycle.run("alerter", _settings(args), serve, uvloop=True)


def cmd_relay(args: argparse.Namespace) -> int:
    import dataclasses

    from heartbeat_registry.core import lifecycle
    from heartbeat_registry.hbreg.relay import serve

    flags = {"relay_addr": args.listen, "relay_flush": args.flush}
    settings = dataclasses.replace(_settings(args), **{k: v for k, v in flags.items() if v is not None})
    return lifecycle.run("relay", settings, serve, uvloop=False)


def cmd_alerts(args: argparse.Namespace) -> int:
    from heartbeat_registry.hbreg import api, tables

    found = api.get(_settings(args), "/api/alerts", limit=args.limit)
    if args.json:
        print(json.dumps(found))
    else:
        print(tables.alerts(found))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from heartbeat_registry.hbreg import api, tables

    tasks = api.get(_settings(args), "/api/tasks", state=args.state)["tasks"]
    if args.json:
        _print_lines(tasks)
    else:
        print(tables.tasks(tasks))
    return 0


def cmd_task(args: argparse.Namespace) -> int:
    import urllib.parse

    from heartbeat_registry.hbreg import api, tables

    task = api.get(_settings(args), "/api/tasks/" + urllib.parse.quote(args.task, safe=""))
    print(json.dumps(task) if args.json else tables.task(task))
    return 0


def cmd_agents(args: argparse.Namespace) -> int:
    from heartbeat_registry.hbreg import api, tables

    agents = api.get(_settings(args), "/api/agents", state=args.state)["agents"]
    if args.json:
        _print_lines(agents)
    else:
        print(tables.agents(agents))
    return 0


def cmd_windows(args: argparse.Namespace) -> int:
    from heartbeat_registry.beats import now_ms
    from heartbeat_registry.hbreg import api, tables

    now = now_ms()
    rows = api.get(
        _settings(args),
        "/api/windows",
        agent=args.agent,
        size=args.size,
        **{"from": now - int(args.since * 1000), "to": now},
    )["windows"]
    if args.json:
        _print_lines(rows)
    else:
        print(tables.windows(rows))
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from heartbeat_registry.hbreg import services

    return services.run(args.service, _settings(args, use_state=False))


# parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from heartbeat_registry.core.views import STATES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--grpc-addr", type=_arg("address"), help="ingest address (HBREG_GRPC_ADDR)")
    common.add_argument("--redis-url", type=_arg("redis_url"), help="Redis/Valkey URL (HBREG_REDIS_URL)")
    common.add_argument(
        "--kafka-bootstrap", type=_arg("bootstrap"), help="Kafka bootstrap servers (HBREG_KAFKA_BOOTSTRAP)"
    )
    common.add_argument("--http-addr", type=_arg("address"), help="query API address (HBREG_HTTP_ADDR)")

    parser = argparse.ArgumentParser(prog="hbreg", description="Heartbeat Registry: operators' tools")
    parser.add_argument("--version", action="version", version=f"hbreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", parents=[common], help="run the whole system (embedded Valkey and Kafka by default)")
    p.add_argument("--demo", type=_arg("count"), default=0, metavar="N", help="also run N simulated agents")
    p.add_argument("--demo-stall-fraction", type=_arg("fraction"), default=0.15, metavar="F", help=argparse.SUPPRESS)
    p.add_argument(
        "--replicas",
        metavar="NAME=N,...",
        help="run several of a process, e.g. ingest=2,bridge=2,worker=2,query=2,reassign=2,alerter=2",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("simulate", parents=[common], help="run simulated agents against a running ingest")
    p.add_argument("--agents", type=_arg("count"), required=True, metavar="N", help="how many agents")
    p.add_argument(
        "--interval", type=_arg("seconds"), required=True, metavar="SECONDS", help="seconds between an agent's beats"
    )
    p.add_argument(
        "--stall-fraction",
        type=_arg("fraction"),
        default=0.0,
        metavar="F",
        help="share of the agents that fall silent now and then (default 0)",
    )
    p.add_argument("--prefix", default="sim", help="agent id prefix (default sim)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable fleets")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "events",
        parents=[common],
        help="print events from agent-events",
        description="Prints the last day's events of the agent-events topic in time order and exits; "
        "with --follow it then keeps printing new events as they come.",
    )
    p.add_argument("--follow", action="store_true", help="after the last day's events, keep printing new ones")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("token", parents=[common], help="mint an agent's bearer token (printed alone on stdout)")
    p.add_argument("agent", metavar="AGENT", help="the agent id the token speaks for")
    p.add_argument(
        "--ttl", type=_arg("seconds"), default=7 * 86400.0, help="lifetime (e.g. 3600, 12h, 30d; default 7d)"
    )
    p.add_argument(
        "--relay-for",
        action="append",
        default=[],
        metavar="AGENT_OR_PREFIX*",
        help="a relay token may also speak for these agents (repeatable; `host-7-*` matches a prefix)",
    )
    p.add_argument(
        "--assigner",
        action="store_true",
        help="a service token for TaskService (a Role Assignment service named AGENT), not an agent's",
    )
    p.set_defaults(func=cmd_token)

    p = sub.add_parser(
        "send",
        parents=[common],
        help="send one heartbeat (a debugging aid)",
        description="Sends one Beat to the ingest and prints the reply as JSON (exit 1 with the status and "
        "message when it is refused).",
    )
    p.add_argument("--agent", required=True, help="agent_id of the heartbeat")
    p.add_argument("--task", default="", help="task_id the agent works on (default: none)")
    p.add_argument("--status", required=True, choices=STATUSES, type=str.upper, help="what the agent is doing")
    p.add_argument("--cpu", type=float, required=True, help="cpu_util, a fraction of the agent's CPU allotment 0-1")
    p.add_argument("--progress", type=float, default=None, help="fraction of the task done, 0-1 (default: unset)")
    p.add_argument("--timeout", type=_arg("seconds"), default=10.0, help="seconds to wait for the reply (default 10)")
    p.add_argument("--token", help="bearer token (default: minted from the local signing secret, if any)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("bench", parents=[common], help="benchmark the real services (throughput, latency percentiles)")
    p.add_argument(
        "suite",
        nargs="?",
        default="ingest",
        choices=("ingest", "pipeline", "detection", "recovery", "dashboard", "tune", "scale"),
        help="what to benchmark (default: ingest)",
    )
    p.add_argument("--heartbeats", type=_arg("count"), default=1_000_000, help="pipeline, tune: backlog size")
    p.add_argument(
        "--agents",
        type=_arg("count"),
        default=None,
        help="detection: fleet size (default 1000); dashboard: (10000); scale: (100000)",
    )
    p.add_argument("--interval", type=_arg("seconds"), default=10.0, help="scale: each agent's beat interval (10s)")
    p.add_argument(
        "--relays", type=_arg("count"), default=None, help="scale: host relays (default 1 per 10,000 agents)"
    )
    p.add_argument("--changes", type=_arg("count"), default=1000, help="dashboard: agents turning stalled, timed")
    p.add_argument("--stalls", type=_arg("count"), default=20_000, help="recovery: the sink's backlog of stall events")
    p.add_argument(
        "--kills", type=_arg("count"), default=None, help="recovery: owners killed (40); scale: agents silenced (100)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--duration",
        type=_arg("seconds"),
        default=None,
        help="seconds of measurement per mode (default 10); pipeline: of the live phase (default 20); "
        "detection: of the fault schedule (default 60); scale: of the whole run (default 600)",
    )
    p.add_argument("--modes", default="beat,batch,stream,fleet", help="comma-separated modes to run")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "chaos",
        help="run the whole system under a fleet and a seeded schedule of faults, and check every outcome",
    )
    p.add_argument("--duration", type=_arg("seconds"), default=1800.0, help="how long the faults go on (30m)")
    p.add_argument("--agents", type=_arg("count"), default=2000, help="simulated agents, one beat a second (2000)")
    p.add_argument("--seed", type=int, default=1, help="the schedule's seed: the same seed, the same faults (1)")
    p.add_argument("--keep", metavar="DIR", help="keep every process's log and data here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_chaos)

    p = sub.add_parser(
        "tune",
        parents=[common],
        help="replay a past period through the detector with other settings: false stalls and delay per set",
    )
    p.add_argument(
        "--since", type=_arg("seconds"), default=3600.0, help="the period: this long, ending --label-grace ago (1h)"
    )
    p.add_argument("--from", dest="from_ms", type=_arg("count"), help="the period's start, epoch milliseconds")
    p.add_argument(
        "--to",
        dest="to_ms",
        type=_arg("count"),
        help="the period's end, epoch milliseconds (default: --label-grace ago)",
    )
    p.add_argument(
        "--grid",
        nargs="+",
        metavar="NAME=V1,V2",
        help="parameter values to try, e.g. phi_threshold=6,8,10 stall_timeout=5s,10s (every combination)",
    )
    p.add_argument("--source", choices=("kafka", "redis"), default="kafka", help="where to read heartbeats")
    p.add_argument("--warmup", type=_arg("seconds"), default=300.0, help="replayed before the period, not counted (5m)")
    p.add_argument(
        "--label-grace",
        type=_arg("seconds"),
        default=60.0,
        help="heartbeats this long after the period still tell a late agent from a dead one (60s)",
    )
    p.add_argument("--processes", type=_arg("count"), help="replay processes (default: one per core)")
    p.add_argument("--report", metavar="FILE.html", help="also write the self-contained HTML report here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("ingest", parents=[common], help="run the gRPC ingest server")
    # a child of `hbreg ingest` with HBREG_INGEST_PROCESSES > 1: its parent serves /metrics and /healthz
    p.add_argument("--no-ops", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("bridge", parents=[common], help="run the Redis Streams -> Kafka bridge")
    p.add_argument("--name", default="bridge-1", help="consumer name in the Redis consumer group")
    p.set_defaults(func=cmd_bridge)
    p = sub.add_parser("worker", parents=[common], help="run a faust processing worker")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("query", parents=[common], help="run the query API (HTTP, JSON)")
    p.set_defaults(func=cmd_query)
    p = sub.add_parser("reassign", parents=[common], help="run the reassignment sink (stalls -> task-reassignments)")
    p.set_defaults(func=cmd_reassign)
    p = sub.add_parser(
        "assigner",
        parents=[common],
        help="run the reference Role Assignment service (task-reassignments -> TaskService.Assign)",
    )
    p.set_defaults(func=cmd_assigner)
    p = sub.add_parser("alerter", parents=[common], help="run the Alertmanager sink (agent-events -> alerts)")
    p.set_defaults(func=cmd_alerter)
    p = sub.add_parser(
        "relay",
        parents=[common],
        help="run the host relay: this host's agents beat through it, it sends the ingest one BeatBatch per flush",
    )
    p.add_argument("--listen", type=_arg("local"), help="unix:///PATH or a loopback HOST:PORT (HBREG_RELAY_ADDR)")
    p.add_argument("--flush", type=_arg("seconds"), help="batching delay, e.g. 5ms (HBREG_RELAY_FLUSH)")
    p.set_defaults(func=cmd_relay)
    p = sub.add_parser(
        "alerts",
        parents=[common],
        help="alerts firing in Alertmanager and the notifications it sent",
        description="The alerts Alertmanager reports active now, and the notifications it delivered to the "
        "webhook receiver (after grouping, inhibition and silences), newest first.",
    )
    p.add_argument("--limit", type=_arg("count"), default=20, help="notifications to show (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON object: firing, notifications")
    p.set_defaults(func=cmd_alerts)
    p = sub.add_parser("tasks", parents=[common], help="tasks with a reassignment history (from the query API)")
    p.add_argument(
        "--state",
        choices=("running", "orphaned", "assigned"),
        help="only tasks in this state (default: orphaned and assigned)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_tasks)
    p = sub.add_parser("task", parents=[common], help="one task: owner, epoch, state and history")
    p.add_argument("task", metavar="TASK")
    p.add_argument("--json", action="store_true", help="the JSON object")
    p.set_defaults(func=cmd_task)
    p = sub.add_parser("agents", parents=[common], help="current state of every agent (from the query API)")
    p.add_argument("--state", choices=STATES, help="only agents in this state")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_agents)
    p = sub.add_parser("windows", parents=[common], help="an agent's window rows (from the query API)")
    p.add_argument("agent", metavar="AGENT")
    p.add_argument("--since", type=_arg("seconds"), default=300.0, help="how far back (e.g. 5m, 1h; default 5m)")
    p.add_argument("--size", help="window size, a multiple of HBREG_WINDOW_SIZE (e.g. 60s: hopping)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_windows)

    p = sub.add_parser("service", parents=[common], help="run an embedded service (used by `hbreg up`)")
    p.add_argument("service", choices=("valkey", "kafka", "alertmanager"))
    p.set_defaults(func=cmd_service)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except ModuleNotFoundError as exc:  # an agent's install: the client only
        print(f"hbreg: needs the server packages ({exc.name} is missing): {SERVER_EXTRA}", file=sys.stderr)
        return 2
    except HeartbeatRegistryError as exc:
        print(f"hbreg: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hbreg events | head`: the reader is gone, which is fine
        from heartbeat_registry.core.lifecycle import silence_stdout

        silence_stdout()
        return 0
    finally:
        logging.shutdown()
