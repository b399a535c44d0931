"""The supervisor binds every port before any worker starts.

Binding in the parent first (with ``SO_REUSEPORT``, as each worker then does) makes a port in
use fail once, with a clear error, instead of in N crash-looping workers, and turns port 0
into one concrete port that every worker binds. The parent keeps its TCP sockets bound, never
listening (so the kernel never hands it a connection), for its whole life: the port stays
reserved while a worker restarts. A bound UDP socket would get its share of the datagrams, so
the caller closes those once every worker is up.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import replace
from typing import Any

import trio

from .._config import GatewayConfig, SourceConfig
from .._errors import ConfigurationError, TransportError

__all__ = ("reserve_ports",)


async def reserve_ports(
    config: GatewayConfig,
    holds: list[trio.socket.SocketType],
    udp_holds: list[trio.socket.SocketType],
) -> GatewayConfig:
    """Bind every source's address with SO_REUSEPORT (each pipeline's too), appending the
    sockets to ``holds`` (TCP) and ``udp_holds`` (UDP), for the caller to close; return the
    workers' config: the concrete ports, ``reuse_port`` on, the admin endpoint on a private
    loopback port."""
    sources = [await _reserve(s, holds, udp_holds) for s in config.sources]
    pipelines = [
        replace(p, sources=tuple([await _reserve(s, holds, udp_holds) for s in p.sources]))
        for p in config.pipelines
    ]
    changes: dict[str, Any] = {
        "sources": tuple(sources),
        "pipelines": tuple(pipelines),
        "admin": "127.0.0.1:0",
    }
    if any(f.name == "workers" for f in dataclasses.fields(GatewayConfig)):
        changes["workers"] = 1
    return replace(config, **changes)


async def _reserve(
    source: SourceConfig,
    holds: list[trio.socket.SocketType],
    udp_holds: list[trio.socket.SocketType],
) -> SourceConfig:
    if source.options.get("reuse_port") is False:
        raise ConfigurationError(
            f"{source.key}.reuse_port", "must be true (or unset) with several workers"
        )
    udp = source.transport == "udp"
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    where = f"{source.host}:{source.port}"
    try:
        infos = await trio.socket.getaddrinfo(
            source.host, source.port, type=kind, flags=socket.AI_PASSIVE
        )
        family, type_, proto, _, address = infos[0]
        sock = trio.socket.socket(family, type_, proto)
        (udp_holds if udp else holds).append(sock)
        if not udp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(address)
    except OSError as exc:
        raise TransportError(
            f"{source.key}: cannot listen on {where}: {exc.strerror or exc}"
        ) from exc
    port = sock.getsockname()[1]
    return replace(source, port=port, options={**source.options, "reuse_port": True})
