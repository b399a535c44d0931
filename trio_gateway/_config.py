"""Configuration: a TOML file and command-line flags -> one frozen :class:`GatewayConfig`.

Every error is a :class:`ConfigurationError` whose ``key`` names the setting to fix
(``queue.capacity``, ``sources[1].port``, ``--tcp``), so the CLI can print one line.

The TOML layout (every key optional; see docs/reference.md)::

    [gateway]
    drain_timeout = 10.0      # seconds to flush the queue into the sink at shutdown
    grace_period = 2.0        # seconds open connections get to finish at shutdown
    batch_size = 1024         # messages per sink batch
    processor = "mypkg.filters:drop_debug"
    workers = 1               # processes sharing the ports with SO_REUSEPORT (docs/workers.md)

    [queue]
    kind = "ring"             # ring | locked-ring | channel | locked-list
    capacity = 10000
    policy = "block"          # block | drop-newest | drop-oldest
    max_bytes = 67108864      # optional bound in payload bytes

    [sink]
    url = "stdout"            # stdout | null | file:PATH | tcp:HOST:PORT | http(s)://... | nats://...
    retry_max_attempts = 0    # 0 = retry until shutdown
    token = "env:NAME"        # any other key is an option of that sink (docs/sinks.md)

    [admin]
    listen = "127.0.0.1:9100" # /metrics, /healthz, /readyz; "off" to turn it off

    [[sources]]
    transport = "tcp"         # tcp | udp | http | websocket | grpc
    listen = "127.0.0.1:7000"
    framing = "newline"       # any other key is passed to the source (max_connections, ...)
    # certfile / keyfile / client_ca: TLS; token = "env:NAME" reads a secret from the environment
"""

from __future__ import annotations

import importlib
import inspect
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ._errors import ConfigurationError
from ._gateway import Gateway, Processor, RetryPolicy
from ._wire import parse_hostport as parse_hostport
from .admin._server import DEFAULT_ADMIN
from .queues import POLICIES, QUEUE_KINDS, OverflowPolicy, Queue
from .sinks import FileSink, HttpSink, NatsSink, NullSink, Sink, StdoutSink, TcpSink
from .sources import GrpcSource, HttpSource, Source, TcpSource, UdpSource, WebSocketSource

__all__ = (
    "DEFAULT_ADMIN",
    "DEFAULT_TCP",
    "DEFAULT_UDP",
    "SOURCE_KINDS",
    "GatewayConfig",
    "QueueConfig",
    "SinkConfig",
    "SourceConfig",
    "build_gateway",
    "load_config",
    "parse_hostport",
)

DEFAULT_TCP = "127.0.0.1:7000"
DEFAULT_UDP = "127.0.0.1:7001"

SOURCE_KINDS: dict[str, type[Source]] = {
    "tcp": TcpSource,
    "udp": UdpSource,
    "http": HttpSource,
    "websocket": WebSocketSource,
    "grpc": GrpcSource,
}
"""Source classes by transport name (``[[sources]] transport = ...``, ``--tcp`` ...)."""

# Keys every source section has that are not constructor options.
_SOURCE_META = ("transport", "listen")
# The [sink] keys that are not options of the sink class.
_SINK_META = ("url", "retry_max_attempts")


@dataclass(frozen=True, slots=True)
class SourceConfig:
    transport: str
    host: str
    port: int
    options: Mapping[str, Any] = field(default_factory=dict)
    key: str = "sources"
    """Where this source came from, for error messages (``sources[0]``, ``--tcp``)."""


@dataclass(frozen=True, slots=True)
class QueueConfig:
    kind: str = "ring"
    capacity: int = 10_000
    policy: OverflowPolicy = "block"
    max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class SinkConfig:
    url: str = "stdout"
    retry_max_attempts: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for the sink class the URL names (``fsync``, ``token``, ``timeout``
    ...), checked against its signature like a source's options; ``env:NAME`` reads a secret."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    sources: tuple[SourceConfig, ...] = ()
    queue: QueueConfig = QueueConfig()
    sink: SinkConfig = SinkConfig()
    drain_timeout: float = 10.0
    grace_period: float = 2.0
    batch_size: int = 1024
    processor: str | None = None
    admin: str | None = None
    """The admin endpoint's HOST:PORT; ``None`` = not asked; ``"off"`` = explicitly off."""
    workers: int = 1
    """Worker processes sharing the ports (``serve --workers N``; see ``_workers.py``)."""

    def with_default_sources(self) -> GatewayConfig:
        """The embedded defaults: TCP on 127.0.0.1:7000, UDP on 127.0.0.1:7001, and the admin
        endpoint on 127.0.0.1:9100 unless it was turned off."""
        if self.sources:
            return self
        return replace(
            self,
            sources=(
                source_from_flag("tcp", DEFAULT_TCP, key="default tcp"),
                source_from_flag("udp", DEFAULT_UDP, key="default udp"),
            ),
            admin=self.admin or DEFAULT_ADMIN,
        )


# -- parsing helpers ----------------------------------------------------------------------


def normalize_policy(value: object, *, key: str) -> OverflowPolicy:
    text = str(value).replace("-", "_")
    for policy in POLICIES:
        if text == policy:
            return policy
    choices = ", ".join(p.replace("_", "-") for p in POLICIES)
    raise ConfigurationError(key, f"must be one of {choices}, got {value!r}")


def source_from_flag(transport: str, listen: str, *, key: str, **options: Any) -> SourceConfig:
    host, port = parse_hostport(listen, key=key)
    return SourceConfig(transport, host, port, options, key=key)


def _expect(section: Mapping[str, Any], name: str, kind: type | tuple[type, ...], key: str) -> Any:
    value = section[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = (
            kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        )
        raise ConfigurationError(f"{key}.{name}", f"expected {expected}, got {value!r}")
    return value


def _check_keys(section: Mapping[str, Any], allowed: Sequence[str], key: str) -> None:
    for name in section:
        if name not in allowed:
            raise ConfigurationError(
                f"{key}.{name}", f"unknown key; expected one of {', '.join(allowed)}"
            )


def config_from_mapping(data: Mapping[str, Any]) -> GatewayConfig:
    """Validate a parsed TOML document into a :class:`GatewayConfig`."""
    _check_keys(data, ("gateway", "queue", "sink", "sources", "admin"), "config")
    config = GatewayConfig()

    gateway = data.get("gateway", {})
    _check_keys(
        gateway, ("drain_timeout", "grace_period", "batch_size", "processor", "workers"), "gateway"
    )
    changes: dict[str, Any] = {}
    for name in ("drain_timeout", "grace_period"):
        if name in gateway:
            changes[name] = float(_expect(gateway, name, (int, float), "gateway"))
    if "batch_size" in gateway:
        changes["batch_size"] = _expect(gateway, "batch_size", int, "gateway")
    if "workers" in gateway:
        changes["workers"] = _expect(gateway, "workers", int, "gateway")
    if "processor" in gateway:
        changes["processor"] = _expect(gateway, "processor", str, "gateway")

    queue = data.get("queue", {})
    _check_keys(queue, ("kind", "capacity", "policy", "max_bytes"), "queue")
    queue_config = QueueConfig(
        kind=_expect(queue, "kind", str, "queue") if "kind" in queue else "ring",
        capacity=_expect(queue, "capacity", int, "queue") if "capacity" in queue else 10_000,
        policy=normalize_policy(queue["policy"], key="queue.policy")
        if "policy" in queue
        else "block",
        max_bytes=_expect(queue, "max_bytes", int, "queue") if "max_bytes" in queue else None,
    )

    sink = data.get("sink", {})
    if not isinstance(sink, dict):
        raise ConfigurationError("sink", "expected a table ([sink])")
    sink_config = SinkConfig(
        url=_expect(sink, "url", str, "sink") if "url" in sink else "stdout",
        retry_max_attempts=_expect(sink, "retry_max_attempts", int, "sink")
        if "retry_max_attempts" in sink
        else 0,
        # Everything else is an option of the sink the URL names, checked when it is built.
        options={k: v for k, v in sink.items() if k not in _SINK_META},
    )

    sources: list[SourceConfig] = []
    raw_sources = data.get("sources", [])
    if not isinstance(raw_sources, list):
        raise ConfigurationError("sources", "expected an array of tables ([[sources]])")
    for index, section in enumerate(raw_sources):
        key = f"sources[{index}]"
        if not isinstance(section, dict):
            raise ConfigurationError(key, "expected a table")
        if "transport" not in section:
            raise ConfigurationError(
                f"{key}.transport", "missing (one of " + ", ".join(SOURCE_KINDS) + ")"
            )
        transport = _expect(section, "transport", str, key)
        listen = _expect(section, "listen", str, key) if "listen" in section else "127.0.0.1:0"
        host, port = parse_hostport(listen, key=f"{key}.listen")
        options = {k: v for k, v in section.items() if k not in _SOURCE_META}
        sources.append(SourceConfig(transport, host, port, options, key=key))

    admin = data.get("admin", {})
    _check_keys(admin, ("listen",), "admin")
    if "listen" in admin:
        listen = _expect(admin, "listen", str, "admin")
        if listen != "off":
            parse_hostport(listen, key="admin.listen")
        changes["admin"] = listen

    return replace(config, sources=tuple(sources), queue=queue_config, sink=sink_config, **changes)


def load_config(path: str) -> GatewayConfig:
    """Read and validate a TOML file; errors name the offending key."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigurationError("--config", f"cannot read {path!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError("--config", f"{path}: invalid TOML: {exc}") from exc
    return config_from_mapping(data)


# -- building -----------------------------------------------------------------------------


def build_source(config: SourceConfig) -> Source:
    cls = SOURCE_KINDS.get(config.transport)
    if cls is None:
        raise ConfigurationError(
            f"{config.key}.transport",
            f"unknown transport {config.transport!r}; expected one of {', '.join(SOURCE_KINDS)}",
        )
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


def build_queue(config: QueueConfig) -> Queue[bytes]:
    cls = QUEUE_KINDS.get(config.kind)
    if cls is None:
        raise ConfigurationError(
            "queue.kind", f"must be one of {', '.join(QUEUE_KINDS)}, got {config.kind!r}"
        )
    try:
        queue: Queue[bytes] = cls(  # type: ignore[assignment]
            config.capacity, policy=config.policy, max_bytes=config.max_bytes
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
}
"""Sink classes by the kind their URL names (``stdout``, ``file:PATH``, ``https://...``)."""


def sink_kind(url: str) -> str:
    """The kind of sink ``url`` names (a key of :data:`SINK_KINDS`)."""
    if url in ("stdout", "null"):
        return url
    for prefix, kind in (
        ("file:", "file"),
        ("tcp:", "tcp"),
        ("http://", "http"),
        ("https://", "http"),
        ("nats://", "nats"),
    ):
        if url.startswith(prefix):
            return kind
    raise ConfigurationError(
        "sink",
        "expected stdout, null, file:PATH, tcp:HOST:PORT, http(s)://HOST/PATH or "
        f"nats://HOST:PORT/SUBJECT, got {url!r}",
    )


def build_sink(config: SinkConfig) -> Sink:
    url = config.url
    kind = sink_kind(url)
    cls = SINK_KINDS[kind]
    positional = {"file": ("path",), "tcp": ("host", "port"), "http": ("url",), "nats": ("url",)}
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


def build_gateway(config: GatewayConfig, *, handle_signals: bool = False) -> Gateway:
    """Instantiate everything a config describes (no I/O happens until ``Gateway.run``)."""
    if config.drain_timeout < 0:
        raise ConfigurationError("gateway.drain_timeout", "must not be negative")
    if config.grace_period < 0:
        raise ConfigurationError("gateway.grace_period", "must not be negative")
    if config.batch_size < 1:
        raise ConfigurationError("gateway.batch_size", "must be at least 1")
    if config.workers < 1:
        raise ConfigurationError("gateway.workers", "must be at least 1")
    if config.sink.retry_max_attempts < 0:
        raise ConfigurationError("sink.retry_max_attempts", "must be 0 (unlimited) or more")
    if not config.sources:
        raise ConfigurationError("sources", "no source configured")
    services = []
    if config.admin and config.admin != "off":
        from .admin import AdminServer

        host, port = parse_hostport(config.admin, key="admin.listen")
        services.append(AdminServer(host, port))
    return Gateway(
        sources=[build_source(s) for s in config.sources],
        services=services,
        queue=build_queue(config.queue),
        sink=build_sink(config.sink),
        processor=load_processor(config.processor) if config.processor else None,
        batch_size=config.batch_size,
        drain_timeout=config.drain_timeout,
        grace_period=config.grace_period,
        retry=RetryPolicy(max_attempts=config.sink.retry_max_attempts or None),
        handle_signals=handle_signals,
    )
