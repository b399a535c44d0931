"""A blocking WebSocket client on ``websockets``' sans-I/O protocol, for benchmark clients
that share the machine's cores with what they measure.

The ``websockets`` library does the protocol here too (the handshake, masking, framing,
parsing, answering pings): what this drops is its I/O layers. Its sync client hands each
received frame from a reader thread to the caller through a lock and a condition, and its
asyncio client runs an event loop with a future per ``recv``; on the 2-core machine those
cost the chat relay's sender and receiver 23 to 33 us of CPU per message, taken from the
gateways they measure. The wire is the same as theirs: each message is one masked frame in
one ``send`` on a TCP_NODELAY socket, and the reader reads what has arrived as it arrives.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ("WsClient",)

_READ = 1 << 18
_DATA = (Opcode.TEXT, Opcode.BINARY)


class WsClient:
    """One connection: ``send(text)`` writes a text frame, ``messages()`` yields the payloads of
    the text and binary messages received."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        uri = parse_uri(url)
        self.sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.protocol = ClientProtocol(uri, max_size=None)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        self._pending: list[Frame] = []  # frames that came in the handshake's last read
        while self.protocol.state is State.CONNECTING:
            self._receive()
            for event in self.protocol.events_received():
                if isinstance(event, Frame):
                    self._pending.append(event)
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc
        # Blocking from here on: with a timeout, Python polls the socket before each call.
        self.sock.settimeout(None)

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def _receive(self) -> None:
        data = self.sock.recv(_READ)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        self._flush()  # pongs, and the close handshake's answer

    def send(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        (data,) = self.protocol.data_to_send()
        self.sock.sendall(data)

    def messages(self) -> Iterator[bytes]:
        """Messages as they arrive, read by blocking reads (bound them with an alarm whose
        handler raises); ends when the connection closes."""
        protocol = self.protocol
        while True:
            for frame in self._pending:
                if frame.opcode in _DATA:
                    if not frame.fin:
                        raise ValueError("a fragmented message: this client reads whole frames")
                    yield frame.data
            if protocol.state is State.CLOSED:
                return
            self._receive()
            self._pending = list(protocol.events_received())

    def close(self) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_close()
            self._flush()
        self.sock.close()
