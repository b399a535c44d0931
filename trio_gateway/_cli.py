"""The command line: ``serve``, ``check-config``, ``top`` and ``send``.

Every configuration error is one line on stderr naming the key, and exit status 2.

Start-up is kept short (``--help`` in well under 0.3 s): this module imports no server, no
Trio and no configuration builder at import time, and only the chosen command's flags are
defined (each command's ``_*_parser`` function), so ``--help`` loads none of them.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ._config._flags import add_serve_arguments
from ._config._schema import DEFAULT_TCP, DEFAULT_UDP
from ._errors import ConfigurationError, GatewayError, SinkUnavailable

if TYPE_CHECKING:
    from ._config import GatewayConfig
    from ._ledger import Ledger
    from .sinks import Sink

__all__ = ("main",)

PROG = "trio_gateway"

EXIT_OK = 0
EXIT_FAILED = 1
"""A runtime failure (a port in use, the sink lost while running) or an unbalanced ledger."""
EXIT_USAGE = 2
"""A bad flag or key, or a sink that cannot work at start: nothing ran."""
EXIT_ABANDONED = 3
"""``serve`` stopped, but messages were abandoned (drain deadline, a second Ctrl-C)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Version(argparse.Action):
    """``--version``: ``trio_gateway 0.1.0``, from the installed package's metadata."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version(PROG)
        except PackageNotFoundError:  # run from a source tree that is not installed
            from . import __version__ as number
        print(f"{PROG} {number}")  # on stdout, as argparse's own version action does
        parser.exit(0)


def _serve_parser(commands: Any, full: bool) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a gateway",
        description=(
            f"Run a gateway. With no source in flags or config: TCP on {DEFAULT_TCP}, "
            f"UDP on {DEFAULT_UDP}, sink stdout."
        ),
        epilog="exit status: 0 stopped with every message accounted for, 1 runtime error, "
        "2 bad flag or key or a sink that cannot work at start, 3 stopped with messages "
        "abandoned (docs/cli.md).",
    )
    if not full:
        return
    add_serve_arguments(serve)
    _add_logging(serve)


def _top_parser(commands: Any, full: bool) -> None:
    top = commands.add_parser("top", help="live view of a running gateway's /metrics")
    if full:
        from .admin import top as top_view

        top_view.add_arguments(top)


def _check_parser(commands: Any, full: bool) -> None:
    check = commands.add_parser(
        "check-config", help="validate a TOML file and print it resolved (secrets redacted)"
    )
    if full:
        check.add_argument("file", metavar="FILE.toml")
        check.add_argument(
            "--mermaid",
            action="store_true",
            help="print the pipelines as a Mermaid flowchart (the docs' pictures)",
        )


def _send_parser(commands: Any, full: bool) -> None:
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
    if not full:
        return
    from .loadgen import DEFAULT_TIMEOUT, FIRST_ANSWER_TIMEOUT, GRPC_MODES

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
        help="--http/--ws/--grpc: send again what a refusal asked to resend later (503, 429, "
        "UNAVAILABLE) or a lost connection left unacknowledged, reconnecting with backoff, up "
        "to N times in a row without progress (0)",
    )
    send.add_argument(
        "--ids",
        metavar="PREFIX",
        help="--http/--grpc: give message N the id PREFIX:N (Idempotency-Key, gRPC "
        "idempotency-key metadata), the same when the command runs again",
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


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument("--log-format", default="text", choices=("text", "json"))


_COMMANDS: dict[str, Callable[[Any, bool], None]] = {
    "serve": _serve_parser,
    "check-config": _check_parser,
    "send": _send_parser,
    "top": _top_parser,
}


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser, with the flags of the command ``argv`` names (the others only listed)."""
    parser = _Parser(prog=PROG, description="Real-time data-pipeline gateway on Trio.")
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, add in _COMMANDS.items():
        add(commands, name == chosen)
    return parser


_SEND_OPTIONS = (  # flag, its argparse dest, the transports it applies to
    ("--framing", "framing", ("tcp",)),
    ("--ndjson", "ndjson", ("http",)),
    ("--retries", "retries", ("http", "ws", "grpc")),
    ("--ids", "ids", ("http", "grpc")),
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
    from .loadgen import TRANSPORTS

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


async def _serve_pipelines(config: GatewayConfig) -> int:
    """``serve`` for named pipelines: every pipeline's listeners, then each one's ledger
    (with its sinks') and the total, one JSON line each."""
    import json
    import logging

    import trio

    from ._config import build_pipelines
    from .tuning import freeze_startup_objects

    pipelines = build_pipelines(config, handle_signals=True)
    log = logging.getLogger("trio_gateway")
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(pipelines.run)
        for pipeline in pipelines:
            sources = pipeline.gateway.sources
            for source, addresses in zip(sources, bound[pipeline.name], strict=True):
                for host, port in addresses:
                    log.info(
                        "pipeline %s listening: %s on %s:%d",
                        pipeline.name,
                        source.transport,
                        host,
                        port,
                    )
        freeze_startup_objects()  # no full collection walks the start again
        log.info("ready")
    for pipeline in pipelines:
        line = {"pipeline": pipeline.name, **pipeline.report()}
        print(json.dumps(line), file=sys.stderr, flush=True)
    print(pipelines.ledger.to_json(), file=sys.stderr, flush=True)
    return exit_status(pipelines.ledger)


async def _serve(config: GatewayConfig) -> int:
    import logging

    import trio

    from ._config import build_gateway
    from .tuning import freeze_startup_objects, tune_allocator

    tune_allocator()  # reuse freed message memory (see its docstring; docs/benchmarks.md)
    if config.pipelines:
        return await _serve_pipelines(config)
    gateway = build_gateway(config, handle_signals=True)
    log = logging.getLogger("trio_gateway")
    ready = False
    try:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            if gateway.state != "stopped":  # else stopped while waiting for the sink
                for source, addresses in zip(gateway.sources, bound, strict=True):
                    for host, port in addresses:
                        log.info("listening: %s on %s:%d", source.transport, host, port)
                freeze_startup_objects()  # no full collection walks the start again
                log.info("ready")
                ready = True
    except BaseException as exc:
        lost = [leaf for leaf in _leaves(exc) if isinstance(leaf, SinkUnavailable)]
        if not (ready and lost):
            raise  # nothing ran: one line, no ledger (main)
        # The sink went away while running (a closed pipe): say so, then the ledger.
        print(f"{PROG}: error: {lost[0]}", file=sys.stderr, flush=True)
        print(gateway.ledger.to_json(), file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(gateway.ledger.to_json(), file=sys.stderr, flush=True)
    return exit_status(gateway.ledger)


def exit_status(ledger: Ledger) -> int:
    """``serve``'s exit status for a gateway that ran: 0, 1 (unbalanced) or 3 (abandoned)."""
    if not ledger.balanced:
        return EXIT_FAILED
    return EXIT_ABANDONED if ledger.abandoned else EXIT_OK


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _check_sinks(sinks: Sequence[Sink]) -> None:
    """Open and close each sink once, as each worker will: a destination that cannot work is
    :class:`SinkUnavailable` here, not N workers failing one after the other."""
    for sink in sinks:
        try:
            await sink.open()
        except SinkUnavailable:
            raise
        except Exception as exc:
            raise SinkUnavailable(sink.name, str(exc) or repr(exc)) from exc
        finally:
            await sink.aclose()


def _run_serve(args: argparse.Namespace) -> int:
    import trio

    from ._config import build_gateway
    from ._config._flags import config_from_args
    from ._log import configure_logging

    configure_logging(args.log_level, args.log_format)
    config = config_from_args(args)
    # Validate everything before binding anything; with workers, the sinks that do not wait
    # for their destination are opened once, here: one line and exit 2 before any starts.
    checked: list[Sink] = []
    if config.pipelines:
        from ._config import build_pipelines

        for pipeline, spec in zip(build_pipelines(config), config.pipelines, strict=True):
            checked += [s for s, c in zip(pipeline.sinks, spec.sinks, strict=True) if not c.wait]
    else:
        gateway = build_gateway(config)
        checked += [] if config.sink.wait else [gateway.sink]
    if config.workers > 1:
        if args.profile:
            raise ConfigurationError("--profile", "profiles one process: use --workers 1")
        from .workers import serve_workers

        trio.run(_check_sinks, checked)
        return trio.run(serve_workers, config)
    # (Not before the workers branch: children would inherit SIG_IGN.)
    # The gateway's own receiver handles SIGINT/SIGTERM while it runs. Outside that window
    # (the first milliseconds, and after the ledger) they are ignored rather than killing
    # the process mid-flush or re-raised as a traceback after it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.profile:
        from ._profile import check_profile_path, profiled

        check_profile_path(args.profile)
        with profiled(args.profile):
            return trio.run(_serve, config)
    return trio.run(_serve, config)


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "check-config":
        from ._config import build_gateway, load_config
        from ._config._describe import describe

        config = load_config(args.file, flag=None).with_default_sources()
        if config.pipelines:
            from ._config import build_pipelines
            from ._config._describe import mermaid

            build_pipelines(config)
            sys.stdout.write(mermaid(config) if args.mermaid else describe(config) + "\n")
            return 0
        if args.mermaid:
            raise ConfigurationError("--mermaid", "the config has no [pipelines] to draw")
        build_gateway(config)
        print(describe(config))
        return 0
    if args.command == "send":
        import trio

        return trio.run(_send, args)
    if args.command == "top":
        from .admin import top as top_view

        return top_view.run_from_args(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(argv)
    if not argv:  # a bare call: what there is to run, not just an error
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
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
        usage = isinstance(first, ConfigurationError | SinkUnavailable)
        return EXIT_USAGE if usage else EXIT_FAILED
