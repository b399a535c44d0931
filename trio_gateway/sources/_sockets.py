"""Sockets for stream sources: listeners (with ``SO_REUSEPORT`` when asked) and peer names."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import sys
import termios
from typing import Any

import trio

from ._options import check_reuse_port

__all__ = (
    "format_peer",
    "open_tcp_listeners",
    "peer_of",
    "socket_of",
    "tcp_quiet",
    "unread_bytes",
)

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = 52
"""Offset of ``tcpi_last_data_recv`` (milliseconds, ``u32``) in Linux's ``struct tcp_info``:
8 bytes of ``u8`` fields, then the ``u32`` fields rto, ato, snd_mss, rcv_mss, unacked, sacked,
lost, retrans, fackets, last_data_sent, last_ack_sent, last_data_recv."""
_BYTES_RECEIVED = 128
"""Offset of ``tcpi_bytes_received`` (``u64``, Linux 4.1 and later): after last_data_recv, the
``u32`` fields last_ack_recv, pmtu, rcv_ssthresh, rtt, rttvar, snd_ssthresh, snd_cwnd, advmss,
reordering, rcv_rtt, rcv_space, total_retrans (100), then the ``u64`` fields pacing_rate,
max_pacing_rate, bytes_acked, bytes_received."""
_TCP_INFO_SIZE = _BYTES_RECEIVED + 8


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


def socket_of(stream: trio.abc.Stream) -> Any:
    """The socket under a socket stream (through TLS); ``None`` for other streams."""
    inner: Any = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    return getattr(inner, "socket", None)


def tcp_quiet(sock: Any) -> tuple[float, bool] | None:
    """What the kernel says of TCP socket ``sock``'s peer: seconds since it last sent data
    (whatever read it; since the connection was set up if it never has), and whether it has
    sent any data at all. ``None`` where the kernel does not say (not Linux, not TCP, closed);
    whether it has sent is ``True`` where the kernel does not count bytes (before 4.1)."""
    if _TCP_INFO is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _LAST_DATA_RECV + 4:
        return None
    millis: int = struct.unpack_from("I", info, _LAST_DATA_RECV)[0]
    spoke = len(info) < _TCP_INFO_SIZE or struct.unpack_from("Q", info, _BYTES_RECEIVED)[0] > 0
    return millis / 1000, spoke


def unread_bytes(sock: Any) -> int:
    """Bytes the peer sent that sit unread in the kernel (``FIONREAD``); 0 if unknown."""
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    count: int = struct.unpack("i", buf)[0]
    return count


def peer_of(stream: trio.abc.Stream) -> str:
    """The remote address of a socket stream (through TLS) as ``host:port``; ``""`` if gone."""
    sock = socket_of(stream)
    try:
        return format_peer(sock.getpeername()) if sock is not None else ""
    except OSError:
        return ""
