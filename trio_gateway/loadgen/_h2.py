"""A small HTTP/2 client for gRPC calls on one Trio stream: a reader task and a writer task.

The mirror of the gateway's own server (``sources/grpc``): the reader feeds ``h2`` and hands
each call its replies and trailers; producers append ``h2``'s output to a buffer that the
writer sends in one ``send_all`` per wake-up (bounded: producers wait above 512 KiB), and
request data goes out as the server's flow-control window allows (under ``--policy block`` a
full queue closes the window and the client waits). Received DATA is acknowledged when the
call reads it, so one window of replies is the most it buffers. No grpcio and no asyncio:
running grpclib's asyncio client in a thread would be simpler, but two event loops, a thread,
and no Trio cancellation inside the call.

``h2`` closes its state machine at a GOAWAY: every frame received after it (the PING of the
gateway's drain, a call's trailers) and every frame sent (a call's DATA, a window update) is
then a protocol error. So a GOAWAY ends the connection here: the calls it refuses (past its
last stream id) end UNAVAILABLE, to be resent on a new connection, and those still open end
as "connection lost" (their fate unknown), whatever the run was doing at the time.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from grpclib.const import Status
from grpclib.metadata import decode_grpc_message, encode_timeout
from h2.settings import SettingCodes

from .._errors import ProtocolError, TransportError
from .._wire import GRPC_CONTENT_TYPE, GRPC_SERVICE
from ..codecs import GrpcMessageDecoder, encode_grpc_message
from ._connect import Peer, connect
from ._options import answer_timeout
from ._run import MAX_REPLY, USER_AGENT, unwrapped_errors

__all__ = ("CONNECTION_LOST", "GrpcCall", "H2Client", "grpc_connection", "grpc_frame")

CONNECTION_LOST = "connection lost"
"""A call's status when its connection ended before its trailers."""
_WRITE_HIGH_WATER = 512 * 1024
_STREAM_WINDOW = 1 << 20
_CONNECTION_WINDOW = 16 << 20
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def grpc_frame(message: Any) -> bytes:
    """A protobuf message with gRPC's 5-byte prefix (uncompressed)."""
    return encode_grpc_message(message.SerializeToString())


def _status_name(code: int) -> str:
    try:
        return str(Status(code).name)
    except ValueError:
        return f"status {code}"


class _GoawayWatch:
    """Walks the server's frame headers to notice a GOAWAY. ``h2`` raises a protocol error on
    any frame after one (the PING of a graceful shutdown), and then never reports the GOAWAY
    that came in the same read: this says the gateway was leaving, not misbehaving."""

    def __init__(self) -> None:
        self._skip = 0  # bytes of the current frame's body still to come
        self._head = b""  # a frame header cut by the end of the last read

    def feed(self, data: bytes | bytearray) -> bool:
        view = self._head + data if self._head else data
        pos, end, found = self._skip, len(view), False
        while pos + 9 <= end:
            found = found or view[pos + 3] == 0x7  # the frame type: GOAWAY
            pos += 9 + int.from_bytes(view[pos : pos + 3], "big")
        self._head, self._skip = (bytes(view[pos:]), 0) if pos <= end else (b"", pos - end)
        return found


class GrpcCall:
    """One call's stream, as the client sees it: replies in, a status at the end."""

    def __init__(self, conn: H2Client, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.decoder = GrpcMessageDecoder(MAX_REPLY)
        self.messages: deque[bytes] = deque()
        self.unacked = 0  # flow-controlled bytes received, handed back when read
        self.headers: dict[str, str] = {}
        self.status: str | None = None  # "OK", a status name, "HTTP 415", CONNECTION_LOST
        self.detail = ""
        self.remote_closed = False
        self.done = trio.Event()
        self._readable: trio.Event | None = None

    # fed by the connection's reader
    def _on_headers(self, headers: list[tuple[str, str]]) -> None:
        first = not self.headers
        self.headers.update(headers)
        content_type = self.headers.get("content-type", "")
        if first and not content_type.startswith("application/grpc"):
            status = self.headers.get(":status", "?")
            self._finish(f"HTTP {status}", f"{content_type or 'no content-type'}, not gRPC")

    def _on_data(self, data: bytes, flow_len: int) -> None:
        self.unacked += flow_len
        try:
            for compressed, payload in self.decoder.feed(data):
                if compressed:
                    self._finish("INTERNAL", "compressed reply without grpc-encoding")
                    return
                self.messages.append(payload)
        except ProtocolError as exc:
            self._finish("INTERNAL", str(exc))
            return
        self._wake()

    def _on_end(self) -> None:
        headers = self.headers
        code = headers.get("grpc-status")
        if code is not None and code.isdigit():
            self._finish(
                _status_name(int(code)), decode_grpc_message(headers.get("grpc-message", ""))
            )
        elif headers.get(":status", "200") != "200":
            self._finish(f"HTTP {headers[':status']}", "")
        else:
            self._finish("UNKNOWN", "the call ended without a grpc-status")

    def _finish(self, status: str, detail: str) -> None:
        self.remote_closed = True
        if self.status is None:
            self.status = status
            self.detail = detail
        self._wake()
        self.done.set()

    def _wake(self) -> None:
        event = self._readable
        if event is not None:
            self._readable = None
            event.set()

    # used by the call's owner
    async def recv_batch(self) -> list[bytes]:
        """Every reply received so far; ``[]`` once the call is over."""
        if self.unacked:
            self.conn.release(self, self.unacked)
            self.unacked = 0
        while not self.messages:
            if self.remote_closed:
                return []
            self._readable = event = trio.Event()
            await event.wait()
        batch = list(self.messages)
        self.messages.clear()
        return batch

    async def send(self, data: bytes, *, end: bool = False) -> bool:
        """Send request bytes as flow control allows; False if the call is already over."""
        return await self.conn.send_data(self, data, end)


class H2Client:
    """HTTP/2 for gRPC calls on one Trio stream (see the module's docstring)."""

    def __init__(self, stream: trio.abc.Stream, peer: Peer) -> None:
        self.stream = stream
        self.peer = peer
        shown = f"[{peer.host}]" if ":" in peer.host else peer.host
        self.authority = f"{shown}:{peer.port}"
        self.scheme = "https" if peer.secure else "http"
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.calls: dict[int, GrpcCall] = {}
        self.terminated = False
        self.lost: TransportError | None = None
        self.answered = trio.Event()  # the server's preface (its SETTINGS) arrived
        self._received = b""  # the first bytes, to name a wrong protocol
        self._goaway = _GoawayWatch()
        self._out: list[bytes] = []
        self._out_size = 0
        self._wake_writer = trio.Event()
        self._flushed = trio.Event()
        self._window_opened = trio.Event()

    # -- output
    def emit(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self._out.append(data)
            self._out_size += len(data)
            self._wake_writer.set()

    async def writer(self) -> None:
        try:
            while True:
                await self._wake_writer.wait()
                self._wake_writer = trio.Event()
                while self._out:
                    data = b"".join(self._out)
                    self._out = []
                    await self.stream.send_all(data)
                    self._out_size -= len(data)
                flushed, self._flushed = self._flushed, trio.Event()
                flushed.set()
        except _BROKEN as exc:
            self._lose(self.peer.error(f"connection lost: {exc}"))

    async def flush(self) -> None:
        while self._out_size > 0 and self.lost is None:
            await self._flushed.wait()

    # -- input
    async def reader(self) -> None:
        h2conn = self.h2
        peer = self.peer
        try:
            while True:
                data = await self.stream.receive_some(256 * 1024)
                if not self.answered.is_set() and len(self._received) < 16:
                    self._received += data[:16]
                if not data:
                    if not self.answered.is_set():
                        self._lose(await peer.closed_before_answer(received=self._received))
                    else:
                        self._lose(peer.error("connection closed by the gateway"))
                    return
                leaving = self._goaway.feed(data)
                try:
                    events = h2conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.emit()
                    if not self.answered.is_set():
                        self._lose(peer.not_ours(self._received, f"bad HTTP/2: {exc}"))
                    else:
                        self._broken(exc, leaving=leaving)
                    return
                for event in events:
                    self._dispatch(event)
                self.emit()
        except _BROKEN as exc:
            self._lose(peer.error(f"connection lost: {exc}"))

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            call = self.calls.get(event.stream_id)
            flow = event.flow_controlled_length or 0
            if call is None:
                self.h2.acknowledge_received_data(flow, event.stream_id)
            else:
                call._on_data(event.data, flow)
        elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            call = self.calls.get(event.stream_id or 0)
            if call is not None:
                call._on_headers(cast("list[tuple[str, str]]", event.headers or []))
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.pop(event.stream_id or 0, None)
            if call is not None:
                call._on_end()
            self._window_opened.set()
        elif isinstance(event, h2.events.StreamReset):
            call = self.calls.pop(event.stream_id or 0, None)
            if call is not None:
                call._finish("CANCELLED", f"stream reset by the gateway ({event.error_code!r})")
            self._window_opened.set()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.answered.set()
            self._window_opened.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.answered.set()
            self.terminated = True
            last = event.last_stream_id or 0
            for stream_id in [s for s in self.calls if s > last]:
                self.calls.pop(stream_id)._finish("UNAVAILABLE", "refused: the gateway is leaving")
            self._lose(self.peer.error("the gateway closed the connection (GOAWAY)"))

    def _broken(self, exc: h2.exceptions.ProtocolError, *, leaving: bool = False) -> None:
        """``h2`` refused a frame, received or sent: after a GOAWAY (``h2`` then refuses
        every frame) the gateway is leaving; otherwise the connection is broken."""
        if self.terminated or leaving:
            self._lose(self.peer.error("the gateway closed the connection (GOAWAY)"))
        else:
            self._lose(self.peer.error(f"HTTP/2 protocol error: {exc}"))

    def _lose(self, exc: TransportError) -> None:
        if self.lost is None:
            self.lost = exc
        self.terminated = True
        for call in self.calls.values():
            call._finish(CONNECTION_LOST, str(self.lost))
        self.calls.clear()
        self.answered.set()
        self._window_opened.set()
        self._flushed.set()

    # -- calls
    def start(self) -> None:
        h2conn = self.h2
        h2conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
            },
        )
        h2conn.initiate_connection()
        h2conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.emit()

    def open_call(
        self,
        method: str,
        *,
        token: str | None,
        step_timeout: float,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> GrpcCall:
        if self.terminated:
            raise self.lost or self.peer.error("the connection is closed")
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", self.scheme),
            (":path", GRPC_SERVICE + method),
            (":authority", self.authority),
            ("content-type", GRPC_CONTENT_TYPE),
            ("te", "trailers"),
            ("user-agent", USER_AGENT),
            ("grpc-timeout", encode_timeout(step_timeout)),
        ]
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        headers.extend(metadata)
        call = GrpcCall(self, stream_id)
        self.calls[stream_id] = call
        self.h2.send_headers(stream_id, headers)
        self.emit()
        return call

    def release(self, call: GrpcCall, size: int) -> None:
        if call.remote_closed or self.lost is not None:
            return
        try:
            self.h2.acknowledge_received_data(size, call.stream_id)
        except h2.exceptions.StreamClosedError:
            return
        except h2.exceptions.ProtocolError as exc:
            self._broken(exc)
            return
        self.emit()

    async def send_data(self, call: GrpcCall, data: bytes, end: bool) -> bool:
        h2conn = self.h2
        total = len(data)
        sent = 0
        while True:
            if call.remote_closed or self.lost is not None:
                return False
            try:
                if sent == total:
                    if end:
                        h2conn.end_stream(call.stream_id)
                        self.emit()
                    break
                window = h2conn.local_flow_control_window(call.stream_id)
                size = min(window, h2conn.max_outbound_frame_size, total - sent)
                if size <= 0:
                    if self._window_opened.is_set():
                        self._window_opened = trio.Event()
                    await self._window_opened.wait()
                    continue
                last = sent + size == total
                h2conn.send_data(call.stream_id, data[sent : sent + size], end_stream=end and last)
            except h2.exceptions.StreamClosedError:
                return False
            except h2.exceptions.ProtocolError as exc:
                self._broken(exc)
                return False
            sent += size
            self.emit()
            if end and last:
                break
            if self._out_size > _WRITE_HIGH_WATER:
                await self.flush()
        if self._out_size > _WRITE_HIGH_WATER:
            await self.flush()
        return True

    def goodbye(self) -> None:
        if self.lost is None:
            try:
                self.h2.close_connection()
            except h2.exceptions.ProtocolError:
                return
            self.emit()


@asynccontextmanager
async def grpc_connection(
    peer: Peer, *, ssl_context: ssl.SSLContext | None, step_timeout: float, first: bool
) -> AsyncIterator[H2Client]:
    """A connection whose server has answered the HTTP/2 preface (for the ``first`` of a run
    within :func:`answer_timeout`: silence then means another protocol on the port)."""
    stream = await connect(peer, ssl_context=ssl_context, step_timeout=step_timeout, first=first)
    answer_within = answer_timeout(step_timeout, first=first)
    if isinstance(stream, trio.SSLStream) and stream.selected_alpn_protocol() != "h2":
        await trio.aclose_forcefully(stream)
        raise peer.error("the TLS server did not agree to HTTP/2 (ALPN h2): wrong transport?")
    client = H2Client(stream, peer)
    with unwrapped_errors():
        async with stream, trio.open_nursery() as nursery:
            client.start()
            nursery.start_soon(client.reader)
            nursery.start_soon(client.writer)
            try:
                with trio.move_on_after(answer_within):
                    await client.answered.wait()
                if not client.answered.is_set():
                    if first:
                        raise peer.no_answer(answer_within)
                    raise peer.error(f"no HTTP/2 answer within {step_timeout:g} s")
                if client.lost is not None:
                    raise client.lost
                yield client
                client.goodbye()
                with trio.move_on_after(step_timeout):
                    await client.flush()
            finally:
                nursery.cancel_scope.cancel()
