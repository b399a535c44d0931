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


def _queue(queue: Mapping[str, Any]) -> QueueConfig:
    _check_keys(
        queue,
        ("kind", "capacity", "policy", "max_bytes", "dir", "fsync", "fsync_interval"),
        "queue",
    )
    disk: dict[str, Any] = {}
    if "dir" in queue:
        disk["dir"] = _expect(queue, "dir", str, "queue")
    if "fsync" in queue:
        disk["fsync"] = canonical(_expect(queue, "fsync", str, "queue"))
    if "fsync_interval" in queue:
        disk["fsync_interval"] = float(_expect(queue, "fsync_interval", (int, float), "queue"))
    return QueueConfig(
        **disk,
        kind=canonical(_expect(queue, "kind", str, "queue")) if "kind" in queue else "ring",
        capacity=_expect(queue, "capacity", int, "queue") if "capacity" in queue else 10_000,
        policy=normalize_policy(queue["policy"], key="queue.policy")
        if "policy" in queue
        else "block",
        max_bytes=_expect(queue, "max_bytes", int, "queue") if "max_bytes" in queue else None,
    )


def _sink(sink: object) -> SinkConfig:
    if not isinstance(sink, dict):
        raise ConfigurationError("sink", "expected a table ([sink])")
    return SinkConfig(
        url=_expect(sink, "url", str, "sink") if "url" in sink else "stdout",
        retry_max_attempts=_expect(sink, "retry_max_attempts", int, "sink")
        if "retry_max_attempts" in sink
        else 0,
        wait=float(_expect(sink, "wait", (int, float), "sink")) if "wait" in sink else 0.0,
        dead_letter=_expect(sink, "dead_letter", str, "sink") if "dead_letter" in sink else None,
        # Everything else is an option of the sink the URL names, checked when it is built.
        options={k: v for k, v in sink.items() if k not in _SINK_META},
    )


def _sources(raw_sources: object) -> tuple[SourceConfig, ...]:
    if not isinstance(raw_sources, list):
        raise ConfigurationError("sources", "expected an array of tables ([[sources]])")
    sources: list[SourceConfig] = []
    for index, section in enumerate(raw_sources):
        key = f"sources[{index}]"
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
    _check_keys(data, ("gateway", "queue", "sink", "sources", "admin", "limits"), "config")
    changes = _gateway_changes(data.get("gateway", {}))
    limits = data.get("limits", {})
    if not isinstance(limits, dict):
        raise ConfigurationError("limits", "expected a table ([limits])")
    _check_keys(limits, ("max_memory",), "limits")
    if "max_memory" in limits:
        changes["max_memory"] = parse_size(limits["max_memory"], key="limits.max_memory")
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
