"""The configuration's shape: frozen dataclasses, the embedded defaults, and the small value
parsers (``HOST:PORT``, policies, sink URLs) that the TOML reader and the flags share.

Nothing here imports a server, a queue or Trio: the command line reads it to build its parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from .._errors import ConfigurationError
from .._names import canonical
from .._secrets import redact_url
from .._wire import DEFAULT_ADMIN as DEFAULT_ADMIN
from .._wire import parse_hostport as parse_hostport

__all__ = (
    "DEFAULT_ADMIN",
    "DEFAULT_MAX_MEMORY",
    "DEFAULT_TCP",
    "DEFAULT_UDP",
    "PIPELINE_PREFIX",
    "POLICY_NAMES",
    "QUEUE_NAMES",
    "TRANSPORTS",
    "GatewayConfig",
    "PipelineConfig",
    "QueueConfig",
    "SinkConfig",
    "SourceConfig",
    "normalize_policy",
    "parse_hostport",
    "parse_size",
    "sink_kind",
    "source_from_flag",
)

DEFAULT_TCP = "127.0.0.1:7000"
DEFAULT_MAX_MEMORY = 256 * 1024 * 1024
"""``limits.max_memory``: the gateway's memory budget (``_budget.DEFAULT_MAX_MEMORY``, without
importing Trio)."""
_SIZE_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
DEFAULT_UDP = "127.0.0.1:7001"

Policy = Literal["block", "drop_newest", "drop_oldest"]
POLICY_NAMES: tuple[Policy, ...] = get_args(Policy)
"""The overflow policies (the queues' ``OverflowPolicy``, without importing Trio)."""
QUEUE_NAMES = ("ring", "locked_ring", "channel", "locked_list")
"""The queue kinds (the keys of ``queues.QUEUE_KINDS``, without importing Trio)."""
DISK_QUEUE = "disk"
"""The disk queue's kind (``--queue disk:DIR``, ``[queue] kind = "disk"`` with ``dir``)."""
FSYNC_NAMES = ("always", "batch", "interval")
"""The disk queue's fsync policies (``queues.FSYNC_POLICIES``, without importing Trio)."""
TRANSPORTS = ("tcp", "udp", "http", "websocket", "grpc", "nats")
"""The source transports (``[[sources]] transport = ...``)."""
PIPELINE_PREFIX = "pipeline:"
"""A pipeline's sink URL that routes to another pipeline, ``pipeline:NAME``
(``_routing.PREFIX``, without importing Trio)."""


@dataclass(frozen=True, slots=True)
class SourceConfig:
    transport: str
    host: str
    port: int
    options: Mapping[str, Any] = field(default_factory=dict)
    key: str = "sources"
    """Where this source came from, for error messages (``sources[0]``, ``--tcp``)."""
    ack: str = "queued"
    """What an answer to the sender means: ``queued`` (in the queue; on disk with the disk
    queue) or ``delivered`` (the sink confirmed it)."""


@dataclass(frozen=True, slots=True)
class QueueConfig:
    kind: str = "ring"
    capacity: int = 10_000
    policy: Policy = "block"
    max_bytes: int | None = None
    dir: str | None = None
    """The disk queue's directory (``kind = "disk"`` only)."""
    fsync: str = "batch"
    """The disk queue's fsync policy: ``always``, ``batch`` or ``interval``."""
    fsync_interval: float = 1.0
    """Seconds between fsyncs under ``fsync = "interval"``."""


@dataclass(frozen=True, slots=True)
class SinkConfig:
    url: str = "stdout"
    retry_max_attempts: int = 0
    wait: float = 0.0
    """Seconds ``serve`` waits at start for a sink whose destination is not there yet (0: it
    fails at once); ``/readyz`` answers 503 with the reason meanwhile."""
    dead_letter: str | None = None
    """Where messages the destination refused for good go: a path (a file sink) or a sink
    URL; None: they are dropped and counted ``refused``."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for the sink class the URL names (``fsync``, ``token``, ``timeout``
    ...), checked against its signature like a source's options; ``env:NAME`` reads a secret."""


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """One ``[pipelines.NAME]`` table: its sources, queue, processor chain and sinks (more
    than one: a fan-out, each sink with its own queue, ``sink_queues``)."""

    name: str
    sources: tuple[SourceConfig, ...] = ()
    queue: QueueConfig = QueueConfig()
    processors: tuple[str, ...] = ()
    sinks: tuple[SinkConfig, ...] = ()
    sink_queues: tuple[QueueConfig | None, ...] = ()
    """Each sink's own queue in a fan-out (None: the default, 10,000 messages, block)."""
    route: str | None = None
    """What a message's route is: a JSON field of its payload, or ``$peer``."""
    sink_routes: tuple[tuple[str, ...] | None, ...] = ()
    """The routes each sink takes (None: every message)."""

    def targets(self) -> list[tuple[int, str]]:
        """The pipelines this one routes to: ``(index of the sink, target name)``."""
        return [
            (index, sink.url.removeprefix(PIPELINE_PREFIX))
            for index, sink in enumerate(self.sinks)
            if sink.url.startswith(PIPELINE_PREFIX)
        ]


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
    """Worker processes sharing the ports (``serve --workers N``; see ``workers/``)."""
    max_memory: int = DEFAULT_MAX_MEMORY
    """``limits.max_memory`` / ``--max-memory``: bytes peers can make the gateway hold (the
    queue's payload bytes, half of it by default, and what is read but not queued yet)."""
    pipelines: tuple[PipelineConfig, ...] = ()
    """Named pipelines (``[pipelines.NAME]``); when given, the top-level sources, queue, sink
    and processor are not (each pipeline has its own)."""

    def with_default_sources(self) -> GatewayConfig:
        """The embedded defaults: TCP on 127.0.0.1:7000, UDP on 127.0.0.1:7001, and the admin
        endpoint on 127.0.0.1:9100 unless it was turned off."""
        if self.sources or self.pipelines:
            return self
        return replace(
            self,
            sources=(
                source_from_flag("tcp", DEFAULT_TCP, key="default tcp"),
                source_from_flag("udp", DEFAULT_UDP, key="default udp"),
            ),
            admin=self.admin or DEFAULT_ADMIN,
        )


def normalize_policy(value: object, *, key: str) -> Policy:
    """A policy in either spelling (``drop-oldest``, ``drop_oldest``) -> the shown one."""
    text = canonical(str(value))
    for policy in POLICY_NAMES:
        if text == policy:
            return policy
    raise ConfigurationError(key, f"must be one of {', '.join(POLICY_NAMES)}, got {value!r}")


def parse_size(value: object, *, key: str) -> int:
    """A positive size in bytes: an integer, or a string such as ``"512MiB"`` (``KiB``,
    ``MiB``, ``GiB``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        digits = text.rstrip("KMGiB").strip()
        unit = text[len(text.rstrip("KMGiB")) :]
        if not digits.isdigit() or unit not in _SIZE_UNITS:
            raise ConfigurationError(
                key, f"expected a size in bytes (268435456, or 256MiB), got {value!r}"
            )
        number = int(digits) * _SIZE_UNITS[unit]
    else:
        raise ConfigurationError(key, f"expected a size in bytes, got {value!r}")
    if number < 1:
        raise ConfigurationError(key, f"must be positive, got {value!r}")
    return number


def source_from_flag(transport: str, listen: str, *, key: str, **options: Any) -> SourceConfig:
    host, port = parse_hostport(listen, key=key)
    return SourceConfig(transport, host, port, options, key=key)


def sink_kind(url: str) -> str:
    """The kind of sink ``url`` names (``stdout``, ``null``, ``file``, ``tcp``, ``http``,
    ``nats``, ``sqlite``, ``postgresql``, ``websocket``, ``ws_listen``)."""
    if url in ("stdout", "null"):
        return url
    for prefix, kind in (
        ("file:", "file"),
        ("tcp:", "tcp"),
        ("http://", "http"),
        ("https://", "http"),
        ("nats://", "nats"),
        ("sqlite:", "sqlite"),
        ("postgresql://", "postgresql"),
        ("postgres://", "postgresql"),
        ("ws://", "websocket"),
        ("wss://", "websocket"),
        ("ws-listen:", "ws_listen"),
    ):
        if url.startswith(prefix):
            return kind
    raise ConfigurationError(
        "sink",
        "expected stdout, null, file:PATH, tcp:HOST:PORT, http(s)://HOST/PATH, "
        "nats://HOST:PORT/SUBJECT, sqlite:PATH, postgresql://..., ws(s)://... or "
        "ws-listen:HOST:PORT, "
        f"got {redact_url(url)!r}",
    )
