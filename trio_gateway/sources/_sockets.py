"""Sockets for stream sources: listeners (with ``SO_REUSEPORT`` when asked) and peer names."""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

import trio

from ._options import check_reuse_port

__all__ = ("format_peer", "open_tcp_listeners", "peer_of")


async def open_tcp_listeners(
    host: str, port: int, *, reuse_port: bool = False, backlog: int | None = None
) -> list[trio.SocketListener]:
    """:func:`trio.open_tcp_listeners`, plus ``SO_REUSEPORT`` set before ``bind`` if asked.

    With ``reuse_port=True`` several sockets (in several processes of the same user) can listen
    on one port and the kernel spreads new connections across them (``serve --workers N``).
    Otherwise the same as trio's: one listener per address ``host`` resolves to,
    ``SO_REUSEADDR``, IPv6 sockets ``IPV6_V6ONLY``, the backlog capped at 65535 (``None``:
    the system's maximum). Raises :class:`OSError` when binding fails.
    """
    check_reuse_port("reuse_port", reuse_port)
    computed_backlog = 0xFFFF if backlog is None else min(backlog, 0xFFFF)
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    unsupported: list[OSError] = []
    try:
        for family, type_, proto, _, address in infos:
            try:
                sock = trio.socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:  # e.g. no IPv6: the other family may do
                    unsupported.append(exc)
                    continue
                raise
            try:
                if sys.platform != "win32":  # there it would let others steal the port
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(computed_backlog)
                listeners.append(trio.SocketListener(sock))
            except BaseException:
                sock.close()
                raise
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        message = f"no usable address family for {host!r}"
        raise OSError(errno.EAFNOSUPPORT, message) from (unsupported[0] if unsupported else None)
    return listeners


def format_peer(address: object) -> str:
    """``("127.0.0.1", 5000)`` -> ``"127.0.0.1:5000"``; IPv6 in brackets."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def peer_of(stream: trio.abc.Stream) -> str:
    """The remote address of a socket stream (through TLS) as ``host:port``; ``""`` if gone."""
    inner: Any = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    try:
        return format_peer(sock.getpeername()) if sock is not None else ""
    except OSError:
        return ""
