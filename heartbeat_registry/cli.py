"""`hbreg`: the command line. It parses arguments and calls the module that does the work."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from heartbeat_registry.errors import ConfigError, HeartbeatRegistryError
from heartbeat_registry.settings import PARSERS, Settings

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


_positive_int, _seconds, _fraction = _arg("count"), _arg("seconds"), _arg("fraction")


def _settings(args: argparse.Namespace, *, use_state: bool = True) -> Settings:
    return Settings.from_env(
        use_state=use_state,
        grpc_addr=getattr(args, "grpc_addr", None),
        redis_url=getattr(args, "redis_url", None),
        kafka_bootstrap=getattr(args, "kafka_bootstrap", None),
        http_addr=getattr(args, "http_addr", None),
    )


# commands --------------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from heartbeat_registry import ops, supervisor

    settings = _settings(args, use_state=False)
    ops.setup_logging("up", settings.log_level)
    return asyncio.run(supervisor.up(settings, demo=args.demo, demo_stall_fraction=args.demo_stall_fraction))


def cmd_simulate(args: argparse.Namespace) -> int:
    from heartbeat_registry.simulate import run_fleet

    settings = _settings(args)
    token_for = None
    if settings.auth:
        from ingest.auth import mint

        secret = settings.signing_secret()
        if secret is None:
            raise ConfigError(
                "auth is on: simulated agents need the signing secret (HBREG_AUTH_SECRET or "
                "HBREG_AUTH_SECRET_FILE, or a running `hbreg up`), or HBREG_AUTH=off"
            )
        token_for = lambda agent: mint(secret, agent, 86400.0)  # noqa: E731
    print(
        f"simulating {args.agents} agents against {settings.grpc_addr}, one beat every {args.interval} s"
        f" ({round(args.agents * args.stall_fraction)} of them stall now and then)",
        flush=True,
    )
    try:
        asyncio.run(
            run_fleet(settings.grpc_addr, args.agents, args.interval, args.stall_fraction,
                      settings.stall_timeout, prefix=args.prefix, seed=args.seed, token_for=token_for)
        )
    except KeyboardInterrupt:
        pass
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from ingest.auth import mint
    from ingest.validate import Refusal, check_id

    settings = _settings(args)
    secret = settings.signing_secret()
    if secret is None:
        raise ConfigError(
            "no signing secret: set HBREG_AUTH_SECRET or HBREG_AUTH_SECRET_FILE, or start `hbreg up` (it makes one)"
        )
    try:
        check_id(args.agent, "AGENT")
        for pattern in args.relay_for:
            check_id(pattern.removesuffix("*"), "--relay-for")
    except Refusal as exc:
        raise ConfigError(str(exc)) from None
    print(mint(secret, args.agent, args.ttl, tuple(args.relay_for)))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    import grpc

    from heartbeat_registry.pb import hb, hb_grpc
    from heartbeat_registry.shapes import reply_json

    settings = _settings(args)
    beat = hb.Heartbeat(
        agent_id=args.agent,
        task_id=args.task,
        status=hb.Status.Value(args.status),
        timestamp=time.time_ns() // 1_000_000,
        cpu_util=args.cpu,
        seq=1,
    )
    if args.progress is not None:
        beat.progress = args.progress
    token = args.token
    if token is None and settings.auth and (secret := settings.signing_secret()) is not None:
        from ingest.auth import mint

        token = mint(secret, args.agent, 300.0)  # on the ingest's own machine: a short-lived token
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(settings.grpc_addr) as channel:
        stub = hb_grpc.HeartbeatServiceStub(channel)
        try:
            reply = stub.Beat(beat, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"hbreg send: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(reply_json(reply)))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from heartbeat_registry.events import print_events

    settings = _settings(args)
    settings.require("kafka_bootstrap")
    try:
        asyncio.run(print_events(settings, follow=args.follow, as_json=args.json))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # SIGTERM unwinds like Ctrl-C, so the services a benchmark started are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.duration = args.duration or {"ingest": 10.0, "pipeline": 20.0, "detection": 60.0}[args.suite]
    if args.suite == "ingest":
        from heartbeat_registry.bench import ingest

        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = sorted(set(modes) - set(ingest.MODES))
        if unknown:
            raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(ingest.MODES)}")
        results = ingest.run(modes, args.duration, args.redis_url, args.grpc_addr)
    elif args.suite == "pipeline":
        from heartbeat_registry.bench import pipeline

        results = pipeline.run(args.heartbeats, args.duration, args.redis_url, args.kafka_bootstrap)
    else:
        from heartbeat_registry.bench import detection

        results = detection.run(args.agents, args.duration, args.redis_url, args.kafka_bootstrap)
    if args.json:
        print(json.dumps(results))
    else:
        print(_bench_table(results))
    return 0


def _bench_table(results: dict) -> str:
    lines = []
    for name, value in results.items():
        if isinstance(value, dict) and name != "machine":
            figures = "  ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"{name:<10} {figures}")
        else:
            lines.append(f"{name:<10} {value}")
    return "\n".join(lines)


def _serve(proc: str, args: argparse.Namespace, main: Callable[[Settings], object], uvloop: bool) -> int:
    from heartbeat_registry import ops

    settings = _settings(args)
    ops.setup_logging(proc, settings.log_level)
    if uvloop:
        ops.install_uvloop()
    asyncio.run(main(settings))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from ingest.server import serve

    # No uvloop here: grpc.aio then polls from a thread of its own, measured 20% slower (docs/benchmarks.md)
    return _serve("ingest", args, serve, uvloop=False)


def cmd_bridge(args: argparse.Namespace) -> int:
    from processors.bridge import serve

    return _serve("bridge", args, lambda s: serve(s, args.name), uvloop=True)


def cmd_worker(args: argparse.Namespace) -> int:
    from processors.worker import run

    return run(_settings(args))


def cmd_query(args: argparse.Namespace) -> int:
    from sinks.query import serve

    return _serve("query", args, serve, uvloop=True)


def _api(settings: Settings, path: str) -> dict:
    """GET the query API; its 4xx answers become one clear line."""
    import urllib.error
    import urllib.request

    url = f"http://{settings.http_addr}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise ConfigError(f"{detail} ({exc.code} from {url})") from None
    except OSError as exc:
        raise ConfigError(f"the query API at {url} is not reachable ({exc}); is `hbreg up` running?") from None


def cmd_agents(args: argparse.Namespace) -> int:
    import urllib.parse

    settings = _settings(args)
    query = f"?state={urllib.parse.quote(args.state)}" if args.state else ""
    agents = _api(settings, f"/api/agents{query}")["agents"]
    if args.json:
        for agent in agents:
            print(json.dumps(agent))
        return 0
    print(f"{'AGENT':<24} {'STATE':<10} {'STATUS':<10} {'TASK':<28} {'CPU':>5} {'PHI':>7} {'SILENT':>8}")
    now = time.time() * 1000
    for a in agents:
        silent = f"{(now - a['last_seen_ms']) / 1000:.1f}s" if a["last_seen_ms"] else "-"
        print(f"{a['agent_id']:<24} {a['state']:<10} {a['status']:<10} {a['task_id'] or '-':<28} "
              f"{a['cpu_util']:>5.2f} {a['phi']:>7.2f} {silent:>8}")
    return 0


def cmd_windows(args: argparse.Namespace) -> int:
    import urllib.parse

    settings = _settings(args)
    now = int(time.time() * 1000)
    params = {"agent": args.agent, "from": now - int(args.since * 1000), "to": now}
    if args.size:
        params["size"] = args.size
    rows = _api(settings, "/api/windows?" + urllib.parse.urlencode(params))["windows"]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'WINDOW START':<20} {'BEATS':>5} {'GAP ms':>7} {'CPU mean':>8} {'min':>5} {'max':>5} {'p95':>5} "
          f"{'slope/min':>9} {'STATE':<10}")
    for r in rows:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["window_start_ms"] / 1000))
        print(f"{start:<20} {r['beats']:>5} {r['longest_gap_ms']:>7} {r['cpu_mean']:>8.3f} {r['cpu_min']:>5.2f} "
              f"{r['cpu_max']:>5.2f} {r['cpu_p95']:>5.2f} {r['cpu_slope_per_min']:>9.3f} "
              f"{(r['state'] or 'open'):<10}")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from heartbeat_registry import services

    return services.run(args.service, _settings(args, use_state=False))


# parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--grpc-addr", type=_arg("address"), help="ingest address (HBREG_GRPC_ADDR)")
    common.add_argument("--redis-url", type=_arg("redis_url"), help="Redis/Valkey URL (HBREG_REDIS_URL)")
    common.add_argument(
        "--kafka-bootstrap", type=_arg("bootstrap"), help="Kafka bootstrap servers (HBREG_KAFKA_BOOTSTRAP)"
    )
    common.add_argument("--http-addr", type=_arg("address"), help="query API address (HBREG_HTTP_ADDR)")

    parser = argparse.ArgumentParser(prog="hbreg", description="Heartbeat Registry")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", parents=[common], help="run the whole system (embedded Valkey and Kafka by default)")
    p.add_argument("--demo", type=_positive_int, default=0, metavar="N", help="also run N simulated agents")
    p.add_argument("--demo-stall-fraction", type=_fraction, default=0.15, metavar="F", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("simulate", parents=[common], help="run simulated agents against a running ingest")
    p.add_argument("--agents", type=_positive_int, required=True, metavar="N")
    p.add_argument("--interval", type=_seconds, required=True, metavar="SECONDS")
    p.add_argument("--stall-fraction", type=_fraction, default=0.0, metavar="F")
    p.add_argument("--prefix", default="sim", help="agent id prefix")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable fleets")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("events", parents=[common], help="print stall/recovery events from agent-events")
    p.add_argument("--follow", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("token", parents=[common], help="mint an agent's bearer token (printed alone on stdout)")
    p.add_argument("agent", metavar="AGENT", help="the agent id the token speaks for")
    p.add_argument("--ttl", type=_arg("seconds"), default=7 * 86400.0, help="lifetime (e.g. 3600, 12h, 30d; default 7d)")
    p.add_argument("--relay-for", action="append", default=[], metavar="AGENT_OR_PREFIX*",
                   help="a relay token may also speak for these agents (repeatable; `host-7-*` matches a prefix)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("send", parents=[common], help="send one heartbeat (a debugging aid)")
    p.add_argument("--agent", required=True)
    p.add_argument("--task", default="")
    p.add_argument("--status", required=True, choices=STATUSES, type=str.upper)
    p.add_argument("--cpu", type=float, required=True)
    p.add_argument("--progress", type=float, default=None)
    p.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for the reply")
    p.add_argument("--token", help="bearer token (default: minted from the local signing secret, if any)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("bench", parents=[common], help="benchmark the real services (throughput, latency percentiles)")
    p.add_argument("suite", nargs="?", default="ingest", choices=("ingest", "pipeline", "detection"),
                   help="what to benchmark (default: ingest)")
    p.add_argument("--heartbeats", type=_positive_int, default=1_000_000, help="pipeline: backlog size")
    p.add_argument("--agents", type=_positive_int, default=1000, help="detection: fleet size")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--duration", type=_seconds, default=None,
                   help="seconds of measurement per mode (default 10); pipeline: of the live phase (default 20); "
                        "detection: of the fault schedule (default 60)")
    p.add_argument("--modes", default="beat,batch,stream,fleet", help="comma-separated modes to run")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("ingest", parents=[common], help="run the gRPC ingest server")
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("bridge", parents=[common], help="run the Redis Streams -> Kafka bridge")
    p.add_argument("--name", default="bridge-1", help="consumer name in the Redis consumer group")
    p.set_defaults(func=cmd_bridge)
    p = sub.add_parser("worker", parents=[common], help="run a faust processing worker")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("query", parents=[common], help="run the query API (HTTP, JSON)")
    p.set_defaults(func=cmd_query)
    p = sub.add_parser("agents", parents=[common], help="current state of every agent (from the query API)")
    p.add_argument("--state", choices=("alive", "suspect", "stalled", "recovered", "left"))
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_agents)
    p = sub.add_parser("windows", parents=[common], help="an agent's window rows (from the query API)")
    p.add_argument("agent", metavar="AGENT")
    p.add_argument("--since", type=_seconds, default=300.0, help="how far back (e.g. 5m, 1h; default 5m)")
    p.add_argument("--size", help="window size, a multiple of HBREG_WINDOW_SIZE (e.g. 60s: hopping)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_windows)

    p = sub.add_parser("service", parents=[common], help="run an embedded service (used by `hbreg up`)")
    p.add_argument("service", choices=("valkey", "kafka"))
    p.set_defaults(func=cmd_service)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HeartbeatRegistryError as exc:
        print(f"hbreg: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hbreg events | head`: the reader is gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        logging.shutdown()
