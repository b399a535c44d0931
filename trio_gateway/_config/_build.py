"""Building: a :class:`GatewayConfig` -> the sources, queue, sink and processor it describes.

Options from TOML are checked against each class's signature and type hints
(:func:`checked_options`), so a wrong name or type is one line naming ``key.name``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from .._errors import ConfigurationError
from .._gateway import Gateway, Processor, RetryPolicy, Service
from .._names import canonical
from ..queues import QUEUE_KINDS, ChannelQueue, DiskQueue, Queue, queue_class
from ..sinks import (
    FileSink,
    HttpSink,
    NatsSink,
    NullSink,
    PostgresSink,
    Sink,
    SqliteSink,
    StdoutSink,
    TcpSink,
    WebSocketBroadcastSink,
    WebSocketSink,
)
from ..sources import (
    GrpcSource,
    HttpSource,
    NatsSource,
    Source,
    TcpSource,
    UdpSource,
    WebSocketSource,
)
from ._schema import (
    DISK_QUEUE,
    GatewayConfig,
    QueueConfig,
    SinkConfig,
    SourceConfig,
    parse_hostport,
    sink_kind,
)

if TYPE_CHECKING:
    from ..admin import AdminServer

__all__ = (
    "SINK_KINDS",
    "SOURCE_KINDS",
    "admin_server",
    "build_gateway",
    "build_queue",
    "build_sink",
    "build_source",
    "check_timings",
    "checked_options",
    "dead_letter_sink",
    "load_processor",
)

SOURCE_KINDS: dict[str, type[Source]] = {
    "tcp": TcpSource,
    "udp": UdpSource,
    "http": HttpSource,
    "websocket": WebSocketSource,
    "grpc": GrpcSource,
    "nats": NatsSource,
}
"""Source classes by transport name (``[[sources]] transport = ...``, ``--tcp`` ...)."""


def build_source(config: SourceConfig) -> Source:
    cls = SOURCE_KINDS.get(config.transport)
    if cls is None:
        raise ConfigurationError(
            f"{config.key}.transport",
            f"unknown transport {config.transport!r}; expected one of {', '.join(SOURCE_KINDS)}",
        )
    if config.transport == "nats":
        # A subscription, not a listener: ``url = "nats://HOST:PORT/SUBJECT"``, no listen.
        given = dict(config.options)
        url = given.pop("url", None)
        if not isinstance(url, str):
            raise ConfigurationError(f"{config.key}.url", "missing (nats://HOST:PORT/SUBJECT)")
        options = checked_options(cls, given, key=config.key, what="nats", positional=())
        try:
            return NatsSource(url, **options)
        except ConfigurationError as exc:
            name = exc.key.partition(".")[2] or "url"
            raise ConfigurationError(f"{config.key}.{name}", exc.message) from exc
    options = checked_options(
        cls, config.options, key=config.key, what=config.transport, positional=("host", "port")
    )
    try:
        return cls(config.host, config.port, **options)
    except ConfigurationError as exc:
        name = exc.key.rpartition(".")[2]
        raise ConfigurationError(f"{config.key}.{name}", exc.message) from exc
    except TypeError as exc:
        raise ConfigurationError(config.key, str(exc)) from exc


def checked_options(
    cls: type[Any],
    given: Mapping[str, Any],
    *,
    key: str,
    what: str,
    positional: Sequence[str],
) -> dict[str, Any]:
    """``given`` as keyword arguments for ``cls``: ``env:NAME`` values read from the
    environment, every name and type checked against ``cls.__init__``'s signature and type
    hints, so that a wrong key or value is a one-line error naming ``key.name``."""
    options = dict(given)
    for name, value in options.items():
        if isinstance(value, str) and value.startswith("env:"):
            # Secrets (tokens) need not sit in a file or on a command line.
            variable = value.removeprefix("env:")
            if variable not in os.environ:
                raise ConfigurationError(
                    f"{key}.{name}", f"environment variable {variable} is not set"
                )
            options[name] = os.environ[variable]
    parameters = inspect.signature(cls.__init__).parameters
    hints = typing.get_type_hints(cls.__init__)
    # Python objects (an SSLContext, service handlers) are not TOML values; the positional
    # parameters come from elsewhere (listen =, the URL).
    hidden = ("self", *positional, "ssl_context", "services")
    allowed = [
        name
        for name, parameter in parameters.items()
        if name not in hidden and parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    for name, value in options.items():
        if name not in allowed:
            raise ConfigurationError(
                f"{key}.{name}",
                f"unknown option for {what}; expected one of {', '.join(allowed) or 'none'}",
            )
        hint = hints.get(name, Any)
        if typing.get_origin(hint) is typing.Literal and isinstance(value, str):
            # One spelling rule: ``drop-oldest`` is ``drop_oldest`` (see _names.py).
            value = options[name] = canonical(value)
        if not _matches(hint, value):
            raise ConfigurationError(f"{key}.{name}", f"expected {_describe(hint)}, got {value!r}")
    return options


def _matches(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits a parameter's type hint (ints are floats; bools are not
    numbers)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(arg, value) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        hint = origin  # Mapping[str, str] -> Mapping: the class checks the items
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is not None:
        hint = typing.get_origin(hint)
    if hint is float:
        return "a number"
    return {str: "a string", int: "an integer", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def build_queue(config: QueueConfig, *, max_memory: int | None = None) -> Queue[bytes]:
    """The queue ``config`` describes; without ``max_bytes``, half of ``max_memory`` (the
    memory budget's share for the queue) bounds its payload bytes, except on the channel
    queue, which counts items only, and the disk queue, whose ``max_bytes`` is on disk."""
    disk_keys = config.dir is not None or config.fsync != "batch" or config.fsync_interval != 1.0
    if config.kind == DISK_QUEUE:
        if not config.dir:
            raise ConfigurationError("queue.dir", 'kind = "disk" needs a directory')
        try:
            return DiskQueue(
                config.dir,
                capacity=config.capacity,
                policy=config.policy,
                max_bytes=config.max_bytes,
                fsync=config.fsync,
                fsync_interval=config.fsync_interval,
            )
        except ConfigurationError as exc:
            raise ConfigurationError(f"queue.{exc.key}", exc.message) from exc
    if disk_keys:
        raise ConfigurationError("queue.dir", 'dir and fsync are for kind = "disk" only')
    cls = queue_class(config.kind)
    if cls is None:
        raise ConfigurationError(
            "queue.kind", f"must be one of {', '.join(QUEUE_KINDS)}, got {config.kind!r}"
        )
    try:
        queue: Queue[bytes] = cls(  # type: ignore[assignment]
            config.capacity,
            policy=config.policy,
            max_bytes=config.max_bytes
            if config.max_bytes is not None or max_memory is None or cls is ChannelQueue
            else max_memory // 2,
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"queue.{exc.key}", exc.message) from exc
    return queue


SINK_KINDS: dict[str, type[Sink]] = {
    "stdout": StdoutSink,
    "null": NullSink,
    "file": FileSink,
    "tcp": TcpSink,
    "http": HttpSink,
    "nats": NatsSink,
    "sqlite": SqliteSink,
    "postgresql": PostgresSink,
    "websocket": WebSocketSink,
    "ws_listen": WebSocketBroadcastSink,
}
"""Sink classes by the kind their URL names (``stdout``, ``file:PATH``, ``https://...``)."""


def build_sink(config: SinkConfig) -> Sink:
    url = config.url
    kind = sink_kind(url)
    cls = SINK_KINDS[kind]
    positional = {
        "file": ("path",),
        "tcp": ("host", "port"),
        "http": ("url",),
        "nats": ("url",),
        "sqlite": ("path",),
        "postgresql": ("url",),
        "websocket": ("url",),
        "ws_listen": ("host", "port"),
    }
    options = checked_options(
        cls,
        config.options,
        key="sink",
        what=f"the {kind} sink",
        positional=positional.get(kind, ()),
    )
    try:
        if kind == "file":
            return FileSink(url.removeprefix("file:"), **options)
        if kind == "tcp":
            host, port = parse_hostport(url.removeprefix("tcp:"), key="sink")
            if port == 0:
                raise ConfigurationError("sink", "tcp sink needs a port other than 0")
            return TcpSink(host, port, **options)
        if kind == "http":
            return HttpSink(url, **options)
        if kind == "nats":
            return NatsSink(url, **options)
        if kind == "sqlite":
            return SqliteSink(url.removeprefix("sqlite:"), **options)
        if kind == "postgresql":
            return PostgresSink(url, **options)
        if kind == "websocket":
            return WebSocketSink(url, **options)
        if kind == "ws_listen":
            host, port = parse_hostport(url.removeprefix("ws-listen:"), key="sink")
            return WebSocketBroadcastSink(host, port, **options)
        return cls(**options)
    except TypeError as exc:
        raise ConfigurationError("sink", str(exc)) from exc


def load_processor(spec: str) -> Processor:
    """``"package.module:function"`` -> the function (from the user's own code)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError("processor", f"expected package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError("processor", f"cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ConfigurationError("processor", f"{module_name} has no {attribute!r}") from exc
    if not callable(target):
        raise ConfigurationError("processor", f"{spec} is not callable")
    processor: Processor = target
    return processor


def dead_letter_sink(spec: str | None) -> Sink | None:
    """``[sink] dead_letter``: a path is a file sink; a URL names any sink."""
    if spec is None:
        return None
    if not spec:
        raise ConfigurationError("sink.dead_letter", "needs a path or a sink URL")
    if "://" in spec or spec in ("stdout", "null") or spec.startswith(("file:", "tcp:")):
        try:
            return build_sink(SinkConfig(url=spec))
        except ConfigurationError as exc:
            raise ConfigurationError("sink.dead_letter", exc.message) from exc
    return FileSink(spec)


def check_timings(config: GatewayConfig) -> None:
    """The ``[gateway]`` numbers a gateway and a pipeline both take."""
    if config.drain_timeout < 0:
        raise ConfigurationError("gateway.drain_timeout", "must not be negative")
    if config.grace_period < 0:
        raise ConfigurationError("gateway.grace_period", "must not be negative")
    if config.batch_size < 1:
        raise ConfigurationError("gateway.batch_size", "must be at least 1")
    if config.workers < 1:
        raise ConfigurationError("gateway.workers", "must be at least 1")


def admin_server(config: GatewayConfig) -> AdminServer | None:
    """The admin endpoint a config asks for (``[admin] listen``), or None when it is off."""
    if not config.admin or config.admin == "off":
        return None
    from ..admin import AdminServer

    host, port = parse_hostport(config.admin, key="admin.listen")
    return AdminServer(host, port)


def build_gateway(config: GatewayConfig, *, handle_signals: bool = False) -> Gateway:
    """Instantiate everything a config describes (no I/O happens until ``Gateway.run``)."""
    if config.pipelines:
        raise ConfigurationError("pipelines", "a config with [pipelines] builds Pipelines")
    check_timings(config)
    if config.workers > 1 and config.queue.kind == DISK_QUEUE:
        raise ConfigurationError("gateway.workers", "the disk queue serves one process")
    if config.sink.wait < 0:
        raise ConfigurationError("sink.wait", "must not be negative")
    if config.sink.retry_max_attempts < 0:
        raise ConfigurationError("sink.retry_max_attempts", "must be 0 (unlimited) or more")
    if not config.sources:
        raise ConfigurationError("sources", "no source configured")
    admin = admin_server(config)
    services: list[Service] = [] if admin is None else [admin]
    sources = [build_source(s) for s in config.sources]
    sink = build_sink(config.sink)
    if callable(getattr(sink, "run", None)):  # a sink with tasks of its own (websocket)
        services.append(cast(Service, sink))
    return Gateway(
        sources=sources,
        ack={source: s.ack for source, s in zip(sources, config.sources, strict=True)},
        services=services,
        queue=build_queue(config.queue, max_memory=config.max_memory),
        sink=sink,
        processor=load_processor(config.processor) if config.processor else None,
        batch_size=config.batch_size,
        drain_timeout=config.drain_timeout,
        grace_period=config.grace_period,
        retry=RetryPolicy(max_attempts=config.sink.retry_max_attempts or None),
        sink_wait=config.sink.wait,
        dead_letter=dead_letter_sink(config.sink.dead_letter),
        handle_signals=handle_signals,
        max_memory=config.max_memory,
    )
