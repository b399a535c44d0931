"""``serve``'s flags: their definitions (:func:`add_serve_arguments`) and how they apply on top of
the TOML file (:func:`config_from_args`: flags override values, listener flags add listeners).
Errors name the flag (``--tcp``, ``--http-token``)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from .._errors import ConfigurationError
from .._names import canonical
from ._schema import (
    DEFAULT_TCP,
    DEFAULT_UDP,
    DISK_QUEUE,
    FSYNC_NAMES,
    POLICY_NAMES,
    QUEUE_NAMES,
    GatewayConfig,
    QueueConfig,
    SourceConfig,
    normalize_policy,
    parse_size,
    sink_kind,
    source_from_flag,
)
from ._toml import load_config

__all__ = ("add_serve_arguments", "config_from_args")


def _queue_flag(value: str, queue: QueueConfig) -> QueueConfig:
    """``--queue KIND`` or ``--queue disk:DIR`` applied to the file's queue settings."""
    kind, colon, directory = value.partition(":")
    if canonical(kind) == DISK_QUEUE:
        if not colon or not directory:
            raise ConfigurationError("--queue", "the disk queue needs a directory: disk:DIR")
        return replace(queue, kind=DISK_QUEUE, dir=directory)
    if colon or canonical(value) not in QUEUE_NAMES:
        choices = ", ".join((*QUEUE_NAMES, "disk:DIR"))
        raise ConfigurationError("--queue", f"must be one of {choices}, got {value!r}")
    return replace(queue, kind=canonical(value), dir=None)


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """``serve``'s configuration flags (logging and the rest are the CLI's)."""
    serve.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    # Each listener flag is repeatable; TCP and UDP also choose their framing.
    listener_flags: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
        (
            "--tcp",
            "a TCP listener",
            ("newline", "length"),
            "framing of the --tcp listeners (default newline)",
        ),
        (
            "--udp",
            "a UDP listener",
            ("raw", "newline"),
            "framing of the --udp listeners: raw (one datagram = one message, as sent) or "
            "newline (one message per line; a trailing newline is stripped) (raw)",
        ),
        ("--http", "an HTTP listener: POST /ingest", (), ""),
        ("--ws", "a WebSocket listener", (), ""),
        ("--grpc", "a gRPC listener", (), ""),
    )
    for flag, text, framings, framing_help in listener_flags:
        serve.add_argument(
            flag, action="append", default=[], metavar="HOST:PORT", help=f"{text} (repeatable)"
        )
        if framings:
            serve.add_argument(
                f"{flag}-framing", type=canonical, choices=framings, help=framing_help
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
    serve.add_argument(
        "--queue",
        metavar="|".join((*QUEUE_NAMES, "disk:DIR")),
        help="queue structure (ring), or a disk queue in DIR",
    )
    serve.add_argument(
        "--queue-fsync",
        type=canonical,
        choices=FSYNC_NAMES,
        help="the disk queue's fsync policy (batch)",
    )
    serve.add_argument("--capacity", type=int, metavar="N", help="queue capacity in messages")
    serve.add_argument("--max-bytes", type=int, metavar="N", help="queue bound in payload bytes")
    serve.add_argument(
        "--max-memory",
        metavar="BYTES",
        help="memory budget: what peers can make the gateway hold, queue included "
        "(256MiB; KiB, MiB, GiB suffixes)",
    )
    serve.add_argument(
        "--policy",
        type=canonical,
        choices=POLICY_NAMES,
        help="overflow policy (block; drop-oldest is drop_oldest)",
    )
    serve.add_argument(
        "--sink",
        metavar="URL",
        help="stdout | null | file:PATH | tcp:HOST:PORT | http(s)://HOST/PATH | "
        "nats://HOST:PORT/SUBJECT[?stream=NAME&create=true] (stdout)",
    )
    serve.add_argument(
        "--sink-wait",
        type=float,
        metavar="SECONDS",
        help="wait this long at start for a sink destination that is not there yet, "
        "/readyz answering 503 meanwhile (0: fail at once, exit 2)",
    )
    serve.add_argument(
        "--ack",
        choices=("queued", "delivered"),
        help="what the HTTP, WebSocket and gRPC listeners' answers mean (queued)",
    )
    serve.add_argument(
        "--dead-letter",
        metavar="PATH|URL",
        help="where messages the destination refuses for good go (a file, or a sink URL)",
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


_FRAMING_FLAGS = ("--tcp-framing", "--udp-framing")


def _framed(
    sources: list[SourceConfig], transport: str, framing: str | None, flag: str, default: str
) -> list[SourceConfig]:
    """``--tcp-framing``/``--udp-framing`` without listener flags: applied to the file's
    listeners of that transport, or, when no listener is configured at all, to a default
    listener of that transport (the default address)."""
    if framing is None:
        return sources
    sources = [
        replace(s, options={**s.options, "framing": framing}) if s.transport == transport else s
        for s in sources
    ]
    if all(s.key in _FRAMING_FLAGS for s in sources):
        sources.append(source_from_flag(transport, default, key=flag, framing=framing))
    return sources


_PIPELINE_PARTS = ("tcp", "udp", "http", "ws", "grpc", "sink", "queue", "capacity", "policy",
                   "max_bytes", "processor", "tcp_framing", "udp_framing")  # fmt: skip


def _check_pipeline_flags(args: argparse.Namespace) -> None:
    """A config with named pipelines has no top-level sources, queue or sink for these
    flags to change: refuse them rather than ignore them."""
    for name in _PIPELINE_PARTS:
        if getattr(args, name, None) not in (None, [], False):
            raise ConfigurationError(
                f"--{name.replace('_', '-')}",
                "the config has [pipelines]: set it in the pipeline (pipelines.NAME.*)",
            )


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The TOML file (if any) with the flags applied on top, then the embedded defaults."""
    config = load_config(args.config) if args.config else GatewayConfig()
    if config.pipelines:
        _check_pipeline_flags(args)
    sources: list[SourceConfig] = list(config.sources)
    framing = {"framing": args.tcp_framing} if args.tcp_framing else {}
    tcp_options = {**framing, **_tls_options(args)}
    sources += [source_from_flag("tcp", v, key="--tcp", **tcp_options) for v in args.tcp]
    udp_options = {"framing": args.udp_framing} if args.udp_framing else {}
    sources += [source_from_flag("udp", v, key="--udp", **udp_options) for v in args.udp]
    sources += _flag_sources(args)
    if not args.tcp:
        sources = _framed(sources, "tcp", args.tcp_framing, "--tcp-framing", DEFAULT_TCP)
    if not args.udp:
        sources = _framed(sources, "udp", args.udp_framing, "--udp-framing", DEFAULT_UDP)
    queue = config.queue
    queue = replace(
        queue,
        capacity=args.capacity if args.capacity is not None else queue.capacity,
        policy=normalize_policy(args.policy, key="--policy") if args.policy else queue.policy,
        max_bytes=args.max_bytes if args.max_bytes is not None else queue.max_bytes,
    )
    if args.queue:
        queue = _queue_flag(args.queue, queue)
    if args.queue_fsync:
        queue = replace(queue, fsync=args.queue_fsync)
    sink = config.sink
    if args.sink:
        if sink.options and sink_kind(args.sink) != sink_kind(sink.url):
            raise ConfigurationError(
                "--sink",
                f"the config's [sink] options ({', '.join(sink.options)}) are for its "
                f"{sink_kind(sink.url)} sink, not {sink_kind(args.sink)}",
            )
        sink = replace(sink, url=args.sink)
    if args.sink_wait is not None:
        sink = replace(sink, wait=args.sink_wait)
    if args.dead_letter is not None:
        sink = replace(sink, dead_letter=args.dead_letter)
    if args.ack is not None:
        answering = ("http", "websocket", "grpc")
        sources = [replace(s, ack=args.ack) if s.transport in answering else s for s in sources]
    changes = {
        name: getattr(args, name)
        for name in ("drain_timeout", "grace_period", "batch_size", "processor", "admin", "workers")
        if getattr(args, name) is not None
    }
    if args.max_memory is not None:
        changes["max_memory"] = parse_size(args.max_memory, key="--max-memory")
    return replace(
        config, sources=tuple(sources), queue=queue, sink=sink, **changes
    ).with_default_sources()
