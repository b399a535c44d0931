"""``serve``'s flags on top of the TOML file: flags override values, listener flags add
listeners. Errors name the flag (``--tcp``, ``--http-token``)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from .._errors import ConfigurationError
from ._schema import (
    DEFAULT_TCP,
    DEFAULT_UDP,
    GatewayConfig,
    QueueConfig,
    SourceConfig,
    normalize_policy,
    sink_kind,
    source_from_flag,
)
from ._toml import load_config

__all__ = ("config_from_args",)


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
        options: dict[str, str] = dict(tls)
        if token:
            options["token"] = token
        elif token is not None:
            raise ConfigurationError(f"{flag}-token", "must not be empty")
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


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The TOML file (if any) with the flags applied on top, then the embedded defaults."""
    config = load_config(args.config) if args.config else GatewayConfig()
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
    if args.sink_wait is not None:
        sink = replace(sink, wait=args.sink_wait)
    changes = {
        name: getattr(args, name)
        for name in ("drain_timeout", "grace_period", "batch_size", "processor", "admin", "workers")
        if getattr(args, name) is not None
    }
    return replace(
        config, sources=tuple(sources), queue=queue, sink=sink, **changes
    ).with_default_sources()
