"""What the supervisor tells a worker: one JSON line on the worker's stdin.

The line holds the resolved :class:`GatewayConfig` (ports made concrete by the parent), the
parent's ``sys.path`` (so a processor importable there imports here too) and its log level.
A frozen config goes through :func:`dataclasses.asdict` one way and :func:`_rebuild` the other,
so the worker builds exactly the gateway the parent checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

from .._config import GatewayConfig
from .._errors import ConfigurationError

__all__ = ("MAX_SPEC", "config_from_jsonable", "config_to_jsonable", "encode_spec", "read_spec")

MAX_SPEC = 16 << 20
"""Bound on the configuration line a worker reads from its stdin."""

T = TypeVar("T")


def config_to_jsonable(config: GatewayConfig) -> dict[str, Any]:
    """A :class:`GatewayConfig` as plain JSON-able data (see :func:`config_from_jsonable`)."""
    return dataclasses.asdict(config)


def config_from_jsonable(data: Mapping[str, Any]) -> GatewayConfig:
    return _rebuild(GatewayConfig, data)


def _rebuild(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild a (nested) frozen config dataclass from :func:`dataclasses.asdict` output."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(cast(Any, cls)):
        if item.name in data:
            kwargs[item.name] = _value(hints[item.name], data[item.name])
    return cls(**kwargs)


def _value(hint: Any, value: Any) -> Any:
    """``value`` (JSON data) as the type ``hint`` says: a config dataclass, a tuple (of
    them), or either or None (a pipeline's ``sink_queues``, ``sink_routes``)."""
    if value is None:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        hint = options[0] if len(options) == 1 else object
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _rebuild(hint, value)
    if typing.get_origin(hint) is tuple:
        (inner, *_) = typing.get_args(hint) or (object,)
        return tuple(_value(inner, v) for v in value)
    return value


def encode_spec(
    worker: int, config: Mapping[str, Any], *, sys_path: Sequence[str], log_level: int
) -> bytes:
    """The line for worker ``worker``; ``config`` is :func:`config_to_jsonable` output."""
    spec = {"worker": worker, "config": config, "sys_path": sys_path, "log_level": log_level}
    try:
        return json.dumps(spec).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise ConfigurationError("sources", f"cannot pass to the workers: {exc}") from exc


def read_spec(fd: int = 0) -> dict[str, Any]:
    """The worker's side: read the one line from ``fd`` unbuffered (the pipe stays open after
    it, and what follows is the parent's to end), bounded by :data:`MAX_SPEC`."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_SPEC:
            raise ConfigurationError("worker", "configuration line too long")
    spec = json.loads(data)
    if not isinstance(spec, dict):
        raise ConfigurationError("worker", "configuration line is not an object")
    return spec
