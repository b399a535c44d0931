"""Reading a TOML file into a :class:`GatewayConfig`: every key and type checked, every error
naming its key (``queue.capacity``, ``sources[1].listen``)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .._errors import ConfigurationError
from .._names import canonical
from ._schema import (
    TRANSPORTS,
    GatewayConfig,
    PipelineConfig,
    QueueConfig,
    SinkConfig,
    SourceConfig,
    normalize_policy,
    parse_hostport,
    parse_size,
)

__all__ = ("config_from_mapping", "load_config")

# Keys every source section has that are not constructor options.
_SOURCE_META = ("transport", "listen", "ack")
# The [sink] keys that are not options of the sink class.
_SINK_META = ("url", "retry_max_attempts", "wait", "dead_letter")


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


def _gateway_changes(gateway: Mapping[str, Any]) -> dict[str, Any]:
    _check_keys(
        gateway, ("drain_timeout", "grace_period", "batch_size", "processor", "workers"), "gateway"
    )
    changes: dict[str, Any] = {}
    for name in ("drain_timeout", "grace_period"):
        if name in gateway:
            changes[name] = float(_expect(gateway, name, (int, float), "gateway"))
    for name in ("batch_size", "workers"):
        if name in gateway:
            changes[name] = _expect(gateway, name, int, "gateway")
    if "processor" in gateway:
        changes["processor"] = _expect(gateway, "processor", str, "gateway")
    return changes


def _queue(queue: Mapping[str, Any], key: str = "queue") -> QueueConfig:
    if not isinstance(queue, dict):
        raise ConfigurationError(key, "expected a table")
    _check_keys(
        queue, ("kind", "capacity", "policy", "max_bytes", "dir", "fsync", "fsync_interval"), key
    )
    disk: dict[str, Any] = {}
    if "dir" in queue:
        disk["dir"] = _expect(queue, "dir", str, key)
    if "fsync" in queue:
        disk["fsync"] = canonical(_expect(queue, "fsync", str, key))
    if "fsync_interval" in queue:
        disk["fsync_interval"] = float(_expect(queue, "fsync_interval", (int, float), key))
    return QueueConfig(
        **disk,
        kind=canonical(_expect(queue, "kind", str, key)) if "kind" in queue else "ring",
        capacity=_expect(queue, "capacity", int, key) if "capacity" in queue else 10_000,
        policy=normalize_policy(queue["policy"], key=f"{key}.policy")
        if "policy" in queue
        else "block",
        max_bytes=_expect(queue, "max_bytes", int, key) if "max_bytes" in queue else None,
    )


def _sink(sink: object, key: str = "sink", meta: Sequence[str] = _SINK_META) -> SinkConfig:
    if not isinstance(sink, dict):
        raise ConfigurationError(key, f"expected a table ([{key}])")
    return SinkConfig(
        url=_expect(sink, "url", str, key) if "url" in sink else "stdout",
        retry_max_attempts=_expect(sink, "retry_max_attempts", int, key)
        if "retry_max_attempts" in sink
        else 0,
        wait=float(_expect(sink, "wait", (int, float), key)) if "wait" in sink else 0.0,
        dead_letter=_expect(sink, "dead_letter", str, key) if "dead_letter" in sink else None,
        # Everything else is an option of the sink the URL names, checked when it is built.
        options={k: v for k, v in sink.items() if k not in meta},
    )


_PIPELINE_KEYS = ("sources", "queue", "processors", "sinks", "route")


def _pipelines(raw: object) -> tuple[PipelineConfig, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigurationError("pipelines", "expected tables ([pipelines.NAME])")
    pipelines: list[PipelineConfig] = []
    for name, section in raw.items():
        key = f"pipelines.{name}"
        if not isinstance(section, dict):
            raise ConfigurationError(key, "expected a table")
        _check_keys(section, _PIPELINE_KEYS, key)
        processors = section.get("processors", [])
        if not isinstance(processors, list) or not all(isinstance(p, str) for p in processors):
            raise ConfigurationError(f"{key}.processors", "expected a list of module:function")
        raw_sinks = section.get("sinks")
        if not isinstance(raw_sinks, list) or not raw_sinks:
            raise ConfigurationError(f"{key}.sinks", "expected an array of tables ([[...sinks]])")
        sinks: list[SinkConfig] = []
        queues: list[QueueConfig | None] = []
        routes: list[tuple[str, ...] | None] = []
        for index, raw_sink in enumerate(raw_sinks):
            sink_key = f"{key}.sinks[{index}]"
            sinks.append(_sink(raw_sink, sink_key, (*_SINK_META, "queue", "routes")))
            queue = raw_sink.get("queue")
            queues.append(None if queue is None else _queue(queue, f"{sink_key}.queue"))
            taken = raw_sink.get("routes")
            if taken is not None and (
                not isinstance(taken, list) or not all(isinstance(r, str) for r in taken)
            ):
                raise ConfigurationError(f"{sink_key}.routes", "expected a list of route names")
            routes.append(None if taken is None else tuple(taken))
        route = section.get("route")
        if route is not None and (not isinstance(route, str) or not route):
            raise ConfigurationError(f"{key}.route", "expected a JSON field name or $peer")
        if route is None and any(r is not None for r in routes):
            raise ConfigurationError(f"{key}.route", "sinks with routes need the pipeline's route")
        pipelines.append(
            PipelineConfig(
                name,
                sources=_sources(section.get("sources", []), f"{key}.sources"),
                queue=_queue(section.get("queue", {}), f"{key}.queue"),
                processors=tuple(processors),
                sinks=tuple(sinks),
                sink_queues=tuple(queues),
                route=route,
                sink_routes=tuple(routes),
            )
        )
    targets = {target for pipeline in pipelines for _, target in pipeline.targets()}
    for pipeline in pipelines:
        if not pipeline.sources and pipeline.name not in targets:
            raise ConfigurationError(
                f"pipelines.{pipeline.name}.sources",
                "a pipeline needs a source (or another pipeline's sink pipeline:NAME)",
            )
    return tuple(pipelines)


def _sources(raw_sources: object, prefix: str = "sources") -> tuple[SourceConfig, ...]:
    if not isinstance(raw_sources, list):
        raise ConfigurationError(prefix, f"expected an array of tables ([[{prefix}]])")
    sources: list[SourceConfig] = []
    for index, section in enumerate(raw_sources):
        key = f"{prefix}[{index}]"
        if not isinstance(section, dict):
            raise ConfigurationError(key, "expected a table")
        if "transport" not in section:
            raise ConfigurationError(
                f"{key}.transport", "missing (one of " + ", ".join(TRANSPORTS) + ")"
            )
        transport = _expect(section, "transport", str, key)
        listen = _expect(section, "listen", str, key) if "listen" in section else "127.0.0.1:0"
        host, port = parse_hostport(listen, key=f"{key}.listen")
        options = {k: v for k, v in section.items() if k not in _SOURCE_META}
        ack = _expect(section, "ack", str, key) if "ack" in section else "queued"
        sources.append(SourceConfig(transport, host, port, options, key=key, ack=ack))
    return tuple(sources)


def config_from_mapping(data: Mapping[str, Any]) -> GatewayConfig:
    """Validate a parsed TOML document into a :class:`GatewayConfig`."""
    _check_keys(
        data, ("gateway", "queue", "sink", "sources", "admin", "limits", "pipelines"), "config"
    )
    changes = _gateway_changes(data.get("gateway", {}))
    limits = data.get("limits", {})
    if not isinstance(limits, dict):
        raise ConfigurationError("limits", "expected a table ([limits])")
    _check_keys(limits, ("max_memory",), "limits")
    if "max_memory" in limits:
        changes["max_memory"] = parse_size(limits["max_memory"], key="limits.max_memory")
    if "pipelines" in data:
        for name in ("sources", "queue", "sink"):
            if name in data:
                raise ConfigurationError(
                    name, "with [pipelines], each pipeline has its own (pipelines.NAME.*)"
                )
        if "processor" in changes:
            raise ConfigurationError(
                "gateway.processor", "with [pipelines], use pipelines.NAME.processors"
            )
        changes["pipelines"] = _pipelines(data["pipelines"])
    admin = data.get("admin", {})
    _check_keys(admin, ("listen",), "admin")
    if "listen" in admin:
        listen = _expect(admin, "listen", str, "admin")
        if listen != "off":
            parse_hostport(listen, key="admin.listen")
        changes["admin"] = listen
    return replace(
        GatewayConfig(),
        sources=_sources(data.get("sources", [])),
        queue=_queue(data.get("queue", {})),
        sink=_sink(data.get("sink", {})),
        **changes,
    )


def load_config(path: str, *, flag: str | None = "--config") -> GatewayConfig:
    """Read and validate a TOML file; errors name the offending key.

    An unreadable or malformed file is named by ``flag`` and the path (``--config: cannot read
    'x.toml'``), or by the path alone when no flag gave it (``check-config FILE``).
    """
    key = flag or path
    where = f"{path}: " if flag else ""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        reading = f"cannot read {path!r}" if flag else "cannot read"
        raise ConfigurationError(key, f"{reading}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(key, f"{where}invalid TOML: {exc}") from exc
    return config_from_mapping(data)
