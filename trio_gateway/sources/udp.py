"""UDP: one datagram is one message (or one message per line); the socket is drained in
batches."""

from __future__ import annotations

import socket
import time
from typing import Any, Literal

import trio

from .._errors import ConfigurationError, TransportError
from .._ingress import Ingress
from .._log import logger
from .._message import Origin
from ._base import Source, check_reuse_port, format_peer
from ._mmsg import MultiReceiver, format_address
from ._mmsg import available as multi_receive_available

__all__ = ("UdpSource",)

_log = logger.getChild("sources.udp")

MAX_UDP_PAYLOAD = 65_507
_SLOTS = 64
"""Datagrams per ``recvmmsg`` call."""
_MULTI_MAX = 3072
"""Datagrams up to this long are read with ``recvmmsg``, longer ones with ``recvfrom``."""


UdpFraming = Literal["raw", "newline"]
FRAMINGS: tuple[UdpFraming, ...] = ("raw", "newline")


def split_lines(datagrams: list[bytes]) -> list[bytes]:
    """``newline`` framing: every line of every datagram, without its ``\n``; empty lines
    are skipped (as the TCP newline decoder does), so a trailing newline adds nothing."""
    lines: list[bytes] = []
    for datagram in datagrams:
        lines += datagram.split(b"\n")
    return [line for line in lines if line]


def format_sender(sender: object) -> str:
    """A sender as ``host:port``: raw (``recvmmsg``) or an address tuple (``recvfrom``)."""
    return format_address(sender) if isinstance(sender, bytes) else format_peer(sender)


class UdpSource(Source):
    """Receives datagrams; each is one message. UDP has no reply, so drops are only counted.

    The loop waits until the socket is readable, then takes up to ``batch_limit`` datagrams,
    offers them in one call per sender and goes back to waiting (the one checkpoint per
    batch). On Linux the datagrams come 64 per ``recvmmsg`` call (:mod:`._mmsg`; 64 buffers of
    ``max_message_size + 1`` bytes, 4 MiB at the default, touched only as far as datagrams
    fill them), elsewhere one per ``recvfrom``. Under ``block`` a full queue stops the reading
    and the kernel's receive buffer (``receive_buffer`` bytes) absorbs what it can; past it the
    kernel drops.
    A datagram over ``max_message_size`` is counted as ``oversize`` and discarded.

    ``framing``: ``"raw"`` (the default) takes each datagram as it came, a trailing newline
    included (``echo x | nc -u`` sends ``b"x\n"``); ``"newline"`` splits each datagram into
    lines and drops the ``\n`` (``b"a\nb\n"`` is two messages, ``a`` and ``b``; empty lines,
    and so an empty datagram, give none).
    ``reuse_port`` sets ``SO_REUSEPORT`` so several processes can bind the port
    (``serve --workers N``; the kernel spreads senders across them by address).
    """

    transport = "udp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_message_size: int = MAX_UDP_PAYLOAD,
        batch_limit: int = 512,
        receive_buffer: int = 4 << 20,
        reuse_port: bool = False,
        framing: UdpFraming = "raw",
    ) -> None:
        super().__init__(host, port, max_message_size=max_message_size)
        if framing not in FRAMINGS:
            raise ConfigurationError(
                "udp.framing", f"must be one of {', '.join(FRAMINGS)}, got {framing!r}"
            )
        self.framing = framing
        if max_message_size > MAX_UDP_PAYLOAD:
            raise ConfigurationError(
                "udp.max_message_size", f"a UDP payload is at most {MAX_UDP_PAYLOAD} bytes"
            )
        if batch_limit < 1:
            raise ConfigurationError("udp.batch_limit", "must be at least 1")
        self.batch_limit = batch_limit
        self.receive_buffer = receive_buffer
        check_reuse_port("udp.reuse_port", reuse_port)
        self.reuse_port = reuse_port
        self.bound: list[tuple[str, int]] = []

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        infos = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        with sock:
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            except OSError:  # the kernel caps it; the default is still usable
                pass
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                # One line naming the listener, like the stream sources' bind failures.
                reason = exc.strerror or str(exc)
                raise TransportError(
                    f"udp {format_peer((self.host, self.port))}: {reason[:1].lower() + reason[1:]}"
                ) from exc
            self.bound = [tuple(sock.getsockname()[:2])]
            receiver = None
            if multi_receive_available():
                slots = min(self.batch_limit, _SLOTS)
                receiver = MultiReceiver(sock, slots=slots, slot_size=self.max_message_size + 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, sock, receiver, ingress)
                task_status.started(self.bound)
                await ingress.wait_stopping()
                nursery.cancel_scope.cancel()
            # What the kernel already holds was sent before we stopped: take it too.
            await self._drain_once(sock, receiver, ingress)

    async def _receive_loop(
        self, sock: socket.socket, receiver: MultiReceiver | None, ingress: Ingress
    ) -> None:
        # recvmmsg costs one more copy per datagram (out of its buffer): 10 to 30% less CPU
        # per datagram than recvfrom up to about 3 KiB, 5 to 13% more at 4 to 7 KiB
        # (docs/design.md). The size of the last datagram decides how the next drain reads.
        small = True
        while True:
            await trio.lowlevel.wait_readable(sock)
            last = await self._drain_once(sock, receiver if small else None, ingress)
            if last >= 0:
                small = last <= _MULTI_MAX

    async def _drain_once(
        self, sock: socket.socket, receiver: MultiReceiver | None, ingress: Ingress
    ) -> int:
        """One drain, offered; returns the length of the last datagram (-1: none came)."""
        if receiver is not None and receiver.failure is None:
            by_sender, oversize, last = self._receive_many(receiver)
            if receiver.failure is not None:
                _log.warning(
                    "%s: recvmmsg failed (%s); reading one datagram a recvfrom from now on",
                    self.label,
                    receiver.failure,
                )
        else:
            by_sender, oversize, last = self._receive_each(sock)
        if oversize:
            ingress.reject("oversize", oversize)
        if by_sender:
            listener = ingress.listener
            now = time.time()
            newline = self.framing == "newline"
            for sender, payloads in by_sender.items():
                # Waits only under ``block`` with a full queue: then the kernel buffers,
                # then drops.
                origin = Origin("udp", listener, format_sender(sender), now)
                await ingress.offer(split_lines(payloads) if newline else payloads, origin)
        return last

    def _receive_many(self, receiver: MultiReceiver) -> tuple[dict[bytes, list[bytes]], int, int]:
        """Up to ``batch_limit`` datagrams by raw sender address, in ``recvmmsg`` calls; how
        many were oversize; the last one's length (-1 if none)."""
        by_sender: dict[bytes, list[bytes]] = {}
        oversize = taken = 0
        last = -1
        for _ in range(-(-self.batch_limit // receiver.slots)):
            try:
                senders, cut, count = receiver.receive()
            except OSError:  # e.g. an ICMP error surfacing: not our senders' data
                if receiver.failure is not None:
                    break  # recvmmsg cannot work here: what came stays for recvfrom
                continue
            oversize += cut
            if count:
                last = receiver.last_length
            for sender, payloads in senders.items():
                held = by_sender.get(sender)
                if held is None:
                    by_sender[sender] = payloads
                else:
                    held.extend(payloads)
            taken += count
            if count < receiver.slots or taken >= self.batch_limit:
                break
        return by_sender, oversize, last

    def _receive_each(self, sock: socket.socket) -> tuple[dict[Any, list[bytes]], int, int]:
        """Up to ``batch_limit`` datagrams by sender address, one ``recvfrom`` each; how many
        were oversize; the last one's length (-1 if none)."""
        # recvfrom, not recvfrom_into a buffer: it returns the datagram as bytes of the right
        # size (one allocation, shrunk in place), where a buffer needs a memoryview slice and
        # a copy per datagram, and a 64 KiB buffer per drain (~0.3 us + ~4 us here).
        receive = sock.recvfrom
        limit = self.max_message_size
        room = limit + 1  # one more byte tells an oversize datagram
        # Datagrams are grouped by sender, one offer per sender per drain: with several
        # senders interleaving, an offer per change of sender was an offer every few
        # datagrams. Each sender's datagrams keep their order (UDP promises no order
        # between senders).
        by_sender: dict[Any, list[bytes]] = {}
        get = by_sender.get
        oversize = 0
        last = -1
        for _ in range(self.batch_limit):
            try:
                data, address = receive(room)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP errors surfacing on the socket: not our sender's data
                continue
            last = len(data)
            if last > limit:
                oversize += 1
                continue
            payloads = get(address)
            if payloads is None:
                by_sender[address] = [data]
            else:
                payloads.append(data)
        return by_sender, oversize, last
