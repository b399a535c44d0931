"""The command line: ``serve``, ``check-config`` and ``send``.

Every configuration error is one line on stderr naming the key, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import trio

from ._config import (
    DEFAULT_TCP,
    DEFAULT_UDP,
    GatewayConfig,
    QueueConfig,
    SourceConfig,
    build_gateway,
    load_config,
    normalize_policy,
    sink_kind,
    source_from_flag,
)
from ._errors import ConfigurationError, GatewayError
from ._profile import check_profile_path, profiled
from .admin import top as top_view
from .loadgen import DEFAULT_TIMEOUT, FIRST_ANSWER_TIMEOUT, GRPC_MODES, TRANSPORTS
from .queues import QUEUE_KINDS
from .tuning import tune_allocator
from .workers import serve_workers

__all__ = ("main",)

PROG = "trio_gateway"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("trio_gateway")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Real-time data-pipeline gateway on Trio.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser(
        "serve",
        help="run a gateway",
        description=(
            f"Run a gateway. With no source in flags or config: TCP on {DEFAULT_TCP}, "
            f"UDP on {DEFAULT_UDP}, sink stdout."
        ),
    )
    serve.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    serve.add_argument(
        "--tcp",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a TCP listener (repeatable)",
    )
    serve.add_argument(
        "--tcp-framing",
        choices=("newline", "length"),
        help="framing of the --tcp listeners (default newline)",
    )
    serve.add_argument(
        "--udp",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a UDP listener (repeatable)",
    )
    for flag, text in (
        ("--http", "an HTTP listener: POST /ingest"),
        ("--ws", "a WebSocket listener"),
        ("--grpc", "a gRPC listener"),
    ):
        serve.add_argument(
            flag, action="append", default=[], metavar="HOST:PORT", help=f"{text} (repeatable)"
        )
    serve.add_argument(
        "--http-token", metavar="TOKEN|env:NAME", help="bearer token the --http listeners require"
    )
    serve.add_argument(
        "--http-cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="pages from ORIGIN (https://app.example) may use the --http listeners (repeatable)",
    )
    serve.add_argument(
        "--ws-token", metavar="TOKEN|env:NAME", help="bearer token the --ws listeners require"
    )
    serve.add_argument(
        "--grpc-token", metavar="TOKEN|env:NAME", help="bearer token the --grpc listeners require"
    )
    serve.add_argument(
        "--tls-cert", metavar="PEM", help="serve TLS on the flag-defined listeners with this cert"
    )
    serve.add_argument("--tls-key", metavar="PEM", help="its private key (if not in --tls-cert)")
    serve.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    serve.add_argument("--queue", choices=tuple(QUEUE_KINDS), help="queue structure (ring)")
    serve.add_argument("--capacity", type=int, metavar="N", help="queue capacity in messages")
    serve.add_argument("--max-bytes", type=int, metavar="N", help="queue bound in payload bytes")
    serve.add_argument(
        "--policy", choices=("block", "drop-newest", "drop-oldest"), help="overflow policy (block)"
    )
    serve.add_argument(
        "--sink",
        metavar="URL",
        help="stdout | null | file:PATH | tcp:HOST:PORT | http(s)://HOST/PATH | "
        "nats://HOST:PORT/SUBJECT[?stream=NAME&create=true] (stdout)",
    )
    serve.add_argument(
        "--processor", metavar="MODULE:FUNCTION", help="a function applied to every message"
    )
    serve.add_argument("--batch-size", type=int, metavar="N", help="messages per sink batch")
    serve.add_argument(
        "--drain-timeout", type=float, metavar="SECONDS", help="bound on the flush at shutdown (10)"
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        metavar="SECONDS",
        help="time open connections get at shutdown (2)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the ports with SO_REUSEPORT (1; docs/workers.md)",
    )
    serve.add_argument(
        "--admin",
        metavar="HOST:PORT|off",
        help="serve /metrics, /healthz, /readyz here (on at 127.0.0.1:9100 with the defaults)",
    )
    serve.add_argument(
        "--profile",
        metavar="FILE",
        help="profile the run: pyinstrument HTML if FILE ends in .html, else cProfile stats",
    )
    _add_logging(serve)

    top = commands.add_parser("top", help="live view of a running gateway's /metrics")
    top_view.add_arguments(top)

    check = commands.add_parser("check-config", help="validate a TOML file and print it resolved")
    check.add_argument("file", metavar="FILE.toml")

    send = commands.add_parser(
        "send",
        help="send test messages to a gateway",
        description=(
            "Send COUNT messages of SIZE bytes over one transport, then print one summary line: "
            "messages, bytes, seconds, msg/s, MB/s, and for HTTP, WebSocket and gRPC how many "
            "the gateway accepted and rejected (by reason)."
        ),
        epilog=(
            "exit status: 0 when the gateway accepted every message (TCP, UDP: when every "
            "message was written), 1 when some were rejected, the gateway went away during "
            "the run or could not be reached (one line names the likely cause), 2 for a bad "
            "flag (the message names it)."
        ),
    )
    target = send.add_mutually_exclusive_group(required=True)
    target.add_argument("--tcp", metavar="HOST:PORT", help="stream frames to a TCP listener")
    target.add_argument("--udp", metavar="HOST:PORT", help="one datagram per message")
    target.add_argument(
        "--http", metavar="URL", help="POST to http[s]://HOST:PORT/PATH (PATH default /ingest)"
    )
    target.add_argument(
        "--ws", metavar="URL", help="one binary message per message to ws[s]://HOST:PORT/PATH"
    )
    target.add_argument(
        "--grpc", metavar="HOST:PORT", help="call the trio_gateway.v1.Gateway service"
    )
    send.add_argument("--count", type=int, default=1000, metavar="N", help="messages (1000)")
    send.add_argument("--size", type=int, default=18, metavar="BYTES", help="message size (18)")
    send.add_argument("--rate", type=float, metavar="MSG_PER_S", help="pace the sending")
    send.add_argument(
        "--concurrency", type=int, metavar="N", help="connections for --http/--ws/--grpc (1)"
    )
    send.add_argument(
        "--framing", choices=("newline", "length"), help="--tcp frame format (newline)"
    )
    send.add_argument(
        "--ndjson", type=int, metavar="K", help="--http: K messages per request, as NDJSON"
    )
    send.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help="--http: send again what a 503 or 429 refused, after its Retry-After, up to N "
        "times per request (0)",
    )
    send.add_argument(
        "--mode",
        choices=GRPC_MODES,
        help="--grpc: unary (a Send call per message; default), stream (one Stream call per "
        "connection, one final Ack), bidi (StreamAcked: an Ack per message)",
    )
    send.add_argument(
        "--acks",
        action="store_true",
        help="--ws: ask for acknowledgements (subprotocol trio-gateway.ack.v1) and count "
        "accepted and refused messages from them",
    )
    send.add_argument(
        "--token",
        metavar="TOKEN|env:NAME",
        help="--http/--ws/--grpc: send Authorization: Bearer TOKEN",
    )
    send.add_argument(
        "--ca",
        "--tls-ca",
        dest="ca",
        metavar="PEM",
        help="trust this CA for https://, wss://, or TLS to --grpc/--tcp (implies --tls)",
    )
    send.add_argument(
        "--tls", action="store_true", help="--grpc/--tcp: use TLS (verified with system CAs)"
    )
    send.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"bound on each connect, write and answer ({DEFAULT_TIMEOUT:g}; "
        f"a new connection's first answer: at most {FIRST_ANSWER_TIMEOUT:g})",
    )
    return parser


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument("--log-format", default="text", choices=("text", "json"))


def _tls_options(args: argparse.Namespace) -> dict[str, str]:
    if args.tls_cert is None:
        if args.tls_key or args.tls_client_ca:
            raise ConfigurationError("--tls-cert", "required with --tls-key / --tls-client-ca")
        return {}
    names = (
        ("certfile", args.tls_cert),
        ("keyfile", args.tls_key),
        ("client_ca", args.tls_client_ca),
    )
    return {name: value for name, value in names if value}


def _flag_sources(args: argparse.Namespace) -> list[SourceConfig]:
    """The --http, --ws and --grpc listeners (TCP's TLS goes with the other --tcp options)."""
    tls = _tls_options(args)
    sources: list[SourceConfig] = []
    for transport, values, token, flag in (
        ("http", args.http, args.http_token, "--http"),
        ("websocket", args.ws, args.ws_token, "--ws"),
        ("grpc", args.grpc, args.grpc_token, "--grpc"),
    ):
        options: dict[str, object] = dict(tls)
        if token:
            options["token"] = token
        elif token is not None:
            raise ConfigurationError(f"{flag}-token", "must not be empty")
        if transport == "http" and args.http_cors_origin:
            options["cors_origins"] = list(args.http_cors_origin)
        sources += [source_from_flag(transport, v, key=flag, **options) for v in values]
    return sources


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The TOML file (if any) with the flags applied on top, then the embedded defaults."""
    config = load_config(args.config) if args.config else GatewayConfig()
    sources: list[SourceConfig] = list(config.sources)
    framing = {"framing": args.tcp_framing} if args.tcp_framing else {}
    tcp_options = {**framing, **_tls_options(args)}
    sources += [source_from_flag("tcp", v, key="--tcp", **tcp_options) for v in args.tcp]
    sources += [source_from_flag("udp", v, key="--udp") for v in args.udp]
    sources += _flag_sources(args)
    if args.tcp_framing and not args.tcp:
        sources = [
            replace(s, options={**s.options, "framing": args.tcp_framing})
            if s.transport == "tcp"
            else s
            for s in sources
        ]
        if not sources:
            sources = [source_from_flag("tcp", DEFAULT_TCP, key="--tcp-framing", **framing)]
    queue = config.queue
    queue = QueueConfig(
        kind=args.queue or queue.kind,
        capacity=args.capacity if args.capacity is not None else queue.capacity,
        policy=normalize_policy(args.policy, key="--policy") if args.policy else queue.policy,
        max_bytes=args.max_bytes if args.max_bytes is not None else queue.max_bytes,
    )
    sink = config.sink
    if args.sink:
        if sink.options and sink_kind(args.sink) != sink_kind(sink.url):
            raise ConfigurationError(
                "--sink",
                f"the config's [sink] options ({', '.join(sink.options)}) are for its "
                f"{sink_kind(sink.url)} sink, not {sink_kind(args.sink)}",
            )
        sink = replace(sink, url=args.sink)
    changes = {
        name: getattr(args, name)
        for name in ("drain_timeout", "grace_period", "batch_size", "processor", "admin", "workers")
        if getattr(args, name) is not None
    }
    return replace(
        config, sources=tuple(sources), queue=queue, sink=sink, **changes
    ).with_default_sources()


async def _serve(config: GatewayConfig) -> int:
    tune_allocator()  # reuse freed message memory (see its docstring; docs/benchmarks.md)
    gateway = build_gateway(config, handle_signals=True)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(gateway.run)
        log = logging.getLogger("trio_gateway")
        for source, addresses in zip(gateway.sources, bound, strict=True):
            for host, port in addresses:
                log.info("listening: %s on %s:%d", source.transport, host, port)
        log.info("ready")
    ledger = gateway.ledger
    print(ledger.to_json(), file=sys.stderr, flush=True)
    return 0 if ledger.balanced else 1


_SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")


def _shown(name: str, value: object) -> str:
    """An option as check-config prints it: a secret only by its ``env:NAME``."""
    if isinstance(value, str) and value.startswith("env:"):
        return repr(value)
    if name == "token":
        return "'<redacted>'"
    if name == "headers" and isinstance(value, dict):
        return repr(
            {
                k: v
                if str(v).startswith("env:") or k.lower() not in _SECRET_HEADERS
                else "<redacted>"
                for k, v in value.items()
            }
        )
    return repr(value)


def _shown_url(url: str) -> str:
    """A sink URL as check-config prints it: the password of ``scheme://user:pass@host`` is
    redacted."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:<redacted>@{host}"))


def _describe(config: GatewayConfig) -> str:
    lines = [
        f"queue: {config.queue.kind}, capacity {config.queue.capacity}, "
        f"policy {config.queue.policy.replace('_', '-')}"
        + (f", max {config.queue.max_bytes} bytes" if config.queue.max_bytes else ""),
        f"sink: {_shown_url(config.sink.url)}"
        + "".join(f", {k}={_shown(k, v)}" for k, v in config.sink.options.items()),
        f"drain timeout {config.drain_timeout} s, grace period {config.grace_period} s, "
        f"batch size {config.batch_size}",
    ]
    if config.processor:
        lines.append(f"processor: {config.processor}")
    if config.workers > 1:
        lines.append(f"workers: {config.workers}")
    for source in config.sources:
        options = "".join(f", {k}={_shown(k, v)}" for k, v in source.options.items())
        lines.append(f"source: {source.transport} on {source.host}:{source.port}{options}")
    return "\n".join(lines)


_SEND_OPTIONS = (  # flag, its argparse dest, the transports it applies to
    ("--framing", "framing", ("tcp",)),
    ("--ndjson", "ndjson", ("http",)),
    ("--retries", "retries", ("http",)),
    ("--mode", "mode", ("grpc",)),
    ("--acks", "acks", ("ws",)),
    ("--tls", "tls", ("tcp", "grpc")),
    ("--ca", "ca", ("tcp", "http", "ws", "grpc")),
    ("--token", "token", ("http", "ws", "grpc")),
    ("--concurrency", "concurrency", ("http", "ws", "grpc")),
)


def _check_send_flags(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Which transport, and the options given for it (a flag given to a transport it does
    not apply to is an error); the values themselves are checked by the load generator."""
    transport = next(name for name in TRANSPORTS if getattr(args, name))
    options: dict[str, Any] = {}
    for flag, dest, owners in _SEND_OPTIONS:
        value = getattr(args, dest)
        if value is None or value is False:
            continue
        if transport not in owners:
            allowed = "/".join(f"--{name}" for name in owners)
            raise ConfigurationError(flag, f"applies to {allowed}, not --{transport}")
        options[dest] = value
    return transport, options


async def _send(args: argparse.Namespace) -> int:
    # Imported here: the other commands (and --help) need neither the client nor rich.
    from .admin.progress import send_progress
    from .loadgen import resolve_token, send

    transport, options = _check_send_flags(args)
    if "token" in options:
        options["token"] = resolve_token(args.token, key="--token")
    options["cafile"] = options.pop("ca", None)
    with send_progress(args.count) as advance:
        summary = await send(
            transport,
            getattr(args, transport),
            count=args.count,
            size=args.size,
            rate=args.rate,
            step_timeout=args.timeout,
            progress=advance,
            **options,
        )
    print(summary.line(), flush=True)
    return 0 if summary.all_accepted else 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        _setup_logging(args.log_level, args.log_format)
        config = config_from_args(args)
        build_gateway(config)  # validate everything before binding anything
        if config.workers > 1:
            if args.profile:
                raise ConfigurationError("--profile", "profiles one process: use --workers 1")
            return trio.run(serve_workers, config)
        # (Not before the workers branch: children would inherit SIG_IGN.)
        # The gateway's own receiver handles SIGINT/SIGTERM while it runs. Outside that window
        # (the first milliseconds, and after the ledger) they are ignored rather than killing
        # the process mid-flush or re-raised as a traceback after it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.profile:
            check_profile_path(args.profile)
            with profiled(args.profile):
                return trio.run(_serve, config)
        return trio.run(_serve, config)
    if args.command == "check-config":
        config = load_config(args.file).with_default_sources()
        build_gateway(config)
        print(_describe(config))
        return 0
    if args.command == "send":
        return trio.run(_send, args)
    if args.command == "top":
        return top_view.run_from_args(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except BaseException as exc:
        # Errors raised inside trio.run arrive wrapped in exception groups: unwrap them, and
        # turn the ones we expect (bad configuration, a port in use) into one line.
        leaves = _leaves(exc)
        if not all(isinstance(leaf, GatewayError | OSError) for leaf in leaves):
            raise
        first = leaves[0]
        print(f"{PROG}: error: {first}", file=sys.stderr)
        return 2 if isinstance(first, ConfigurationError) else 1
