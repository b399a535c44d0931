"""Sans-I/O reading of a WebSocket client's frames: the common frames fast, the rest by websockets.

:class:`MessageReader` turns the bytes a WebSocket client sends (after the opening handshake)
into messages. It owns one reused receive buffer. Frames of the common kind -- a complete,
unfragmented, masked text or binary frame, within the message size limit, with no reserved bit
set -- it decodes itself: the header with a few byte reads, the payload unmasked straight out of
the buffer by websockets' C ``apply_mask``, which is the one copy the payload needs anyway. Every
other frame (ping, pong, close, fragments, anything malformed or too big) is handed to the
connection's :class:`websockets.server.ServerProtocol` as it is, so that every answer stays
websockets' own: pongs, the closing handshake, close codes 1002 (protocol error) and 1009 (too
big), and the order of the checks. The protocol is only ever handed whole frames from a frame
boundary, except in *through* mode: once the connection is not ``OPEN`` any more (closing,
failed) or a frame header announces that the protocol will fail, every byte goes to the protocol
and the reader decodes nothing itself again.

Why not feed everything to the protocol (measured on 79,435-byte frames, 256 KiB reads, this
machine): websockets' ``StreamReader`` appends each read to its own ``bytearray``, and
``Frame.parse`` steps a generator five times per frame and copies each payload out
(``buffer[:n]``) before unmasking it into a third copy: 13-15 us of CPU per 79 KB message against
8 us here, and 2.5 us against 0.5 us per 18-byte message. Reading into one reused buffer also
spares the allocation of a fresh chunk per read. The buffer grows while reads fill it (a sender
that is ahead of us), so that one read carries many large frames: 1 MiB reads cost about 40%
less CPU per 79 KB message than 256 KiB reads, through the per-read costs (the scheduler, the
queue offer, the system call) spread over more messages.

Text messages are validated as UTF-8 here (websockets' Sans-I/O layer leaves that to the
connection), once per call: the texts joined by ``\\n`` decode exactly when each one does.
A message that does not fails the connection with 1007.

Nothing here does I/O or imports trio: the caller reads into :meth:`MessageReader.read_buffer`
(or hands over a chunk with :meth:`MessageReader.feed`), then sends what the protocol wants to
send (``protocol.data_to_send()``).
"""

from __future__ import annotations

from typing import Any, cast

from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ("INITIAL_BUFFER", "MAX_BUFFER", "MessageReader", "frame_boundary")

INITIAL_BUFFER = 16 * 1024
"""Receive buffer of a new connection, and what it shrinks back to once reads are small."""
MAX_BUFFER = 1024 * 1024
"""Largest receive buffer: a connection's reads grow up to this while the sender stays ahead.
Frames larger than this (less the 14-byte header) are handed to the protocol instead."""

_OPEN = State.OPEN
_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_CONT = Opcode.CONT
_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
_VALID_OPCODES = frozenset(int(opcode) for opcode in Opcode)
_UNLIMITED = 1 << 63


def _header(data: bytes | bytearray, start: int, end: int) -> tuple[int, int] | None:
    """``(header length, payload length)`` of the frame at ``start``, or None if the header is
    not complete in ``data[start:end]``. Masked frames only (a client's)."""
    if end - start < 2:
        return None
    length = data[start + 1] & 0x7F
    if length < 126:
        return 6, length
    if length == 126:
        if end - start < 4:
            return None
        return 8, int.from_bytes(data[start + 2 : start + 4], "big")
    if end - start < 10:
        return None
    return 14, int.from_bytes(data[start + 2 : start + 10], "big")


def frame_boundary(data: bytes) -> int:
    """Where the last complete frame in ``data`` (a run of masked client frames) ends: the
    bytes after it are the start of a frame not yet complete."""
    pos = 0
    while True:
        header = _header(data, pos, len(data))
        if header is None or pos + header[0] + header[1] > len(data):
            return pos
        pos += header[0] + header[1]


class MessageReader:
    """Messages from the frames a WebSocket client sends, for one ``OPEN`` connection.

    ``protocol`` is the connection's :class:`~websockets.server.ServerProtocol`, after its
    handshake. ``behind_handshake`` are the bytes that came after the handshake request and
    were already given to the protocol: if they end inside a frame, the rest of that frame is
    handed to the protocol too, and the reader takes over at the next frame boundary.

    Per read: write into :meth:`read_buffer` and call :meth:`received` with the byte count (0 at
    end of stream), or hand a chunk to :meth:`feed`. Either returns the payloads of the messages
    completed (text as its UTF-8 bytes), in order; :attr:`frames` counts the frames completed
    (control frames included); :attr:`invalid_text` is set when a text message was not UTF-8
    (the protocol was failed with 1007 and the messages from that one on were dropped).
    """

    __slots__ = (
        "_buffer",
        "_end",
        "_fast_limit",
        "_fed",
        "_filled",
        "_fragment_bytes",
        "_fragment_is_text",
        "_fragments",
        "_frame",
        "_initial",
        "_limit",
        "_min_read",
        "_need",
        "_owed",
        "_payloads",
        "_start",
        "_texts",
        "_through",
        "_view",
        "frames",
        "invalid_text",
        "max_buffer",
        "protocol",
    )

    def __init__(
        self,
        protocol: ServerProtocol,
        *,
        behind_handshake: bytes = b"",
        initial_buffer: int = INITIAL_BUFFER,
        max_buffer: int = MAX_BUFFER,
    ) -> None:
        if not 0 < initial_buffer <= max_buffer:
            raise ValueError("need 0 < initial_buffer <= max_buffer")
        self.protocol = protocol
        self.max_buffer = max_buffer
        self._initial = initial_buffer
        # Compact the buffer rather than read into less free space than this.
        self._min_read = max(1, initial_buffer // 4)
        limit = protocol.max_message_size
        self._limit = _UNLIMITED if limit is None else limit
        fragment = protocol.max_fragment_size
        if fragment is not None:
            self._limit = min(self._limit, fragment)
        # Frames the buffer can hold whole are decoded here; larger ones go to the protocol.
        self._fast_limit = min(self._limit, max_buffer - 14)
        # A frame begun behind the handshake request: the protocol has these bytes already.
        tail = behind_handshake[frame_boundary(behind_handshake) :]
        self._buffer = bytearray(max(initial_buffer, len(tail)))
        self._buffer[: len(tail)] = tail
        self._view = memoryview(self._buffer)
        self._start = 0  # the protocol has taken everything before start (+ _fed)
        self._end = len(tail)
        self._fed = len(tail)  # bytes from _start on that the protocol has (header incomplete)
        self._owed = 0  # bytes of the current frame still to hand to the protocol
        self._need = 0  # size of the frame waiting at _start, once its header is known
        self._filled = False  # the last read filled all the space it was given
        self._through = False  # everything goes to the protocol from now on
        self._fragments: list[bytes] = []
        self._fragment_bytes = 0
        self._fragment_is_text = False
        self._frame = 0  # size of the frame being handed to the protocol (while _owed)
        self._payloads: list[bytes] = []
        self._texts: list[int] = []
        self.frames = 0
        self.invalid_text = False

    @property
    def buffered(self) -> int:
        """Bytes of a frame received but not complete yet (here or in the protocol)."""
        return self._end - self._start + self._owed

    @property
    def held(self) -> int:
        """Bytes this connection holds for its next messages: the receive buffer, the fragments
        of a message not complete, and the part of a large frame the protocol has (what the
        memory budget is charged)."""
        held = len(self._buffer) + self._fragment_bytes
        if self._owed:
            held += self._frame - self._owed
        return held

    @property
    def passing_through(self) -> bool:
        """Every byte goes to the protocol now (the connection is closing or failed)."""
        return self._through

    @property
    def filled(self) -> bool:
        """The last read took all the space it was given: more is likely waiting."""
        return self._filled

    @property
    def capacity(self) -> int:
        """Size of the receive buffer now."""
        return len(self._buffer)

    # -- input --------------------------------------------------------------------------------

    def read_buffer(self) -> memoryview:
        """Where the next read goes: the free space at the end of the buffer (never empty)."""
        start, end = self._start, self._end
        if start == end:
            start = end = self._start = self._end = 0
            if not self._filled:  # all taken, no reason to grow: the whole buffer (the usual)
                return self._view
        size = len(self._buffer)
        max_buffer = self.max_buffer
        live = end - start
        # Room for a read of at least _min_read (at least one byte).
        target = max(min(live + self._min_read, max_buffer), live + 1)
        if self._filled and size < max_buffer:
            # The last read took all it was given: the sender is ahead, read more at once.
            target = max(target, min(size * 2, max_buffer))
        if self._need > size:
            # Room for the frame waiting at start, but at most twice what has arrived of it:
            # a header alone (announcing a large frame) does not buy a large buffer.
            target = max(target, min(self._need, 2 * live))
        if target > size:
            self._resize(target)
        elif start and (size - end < self._min_read or start + self._need > size):
            self._compact()
        return self._view[self._end :]

    def received(self, size: int) -> list[bytes]:
        """``size`` bytes were written into :meth:`read_buffer`; 0 means end of stream."""
        self.frames = 0
        self._receive(size)
        return self._finish()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """:meth:`received` for a chunk read elsewhere (a TLS stream): copied into the buffer."""
        self.frames = 0
        view = memoryview(data)
        if not view:
            self._receive(0)
        while view:
            space = self.read_buffer()
            n = min(len(space), len(view))
            space[:n] = view[:n]
            view = view[n:]
            self._receive(n)
        return self._finish()

    def _receive(self, size: int) -> None:
        if not size:
            self._eof()
            return
        self._filled = size == len(self._buffer) - self._end
        self._end += size
        self._scan()
        if self._start == self._end and size < self._initial // 2:
            self._shrink()

    def take_events(self, events: list[Any]) -> list[bytes]:
        """The messages in events the protocol already produced (frames that came with the
        handshake request)."""
        self.frames = 0
        self._events(events)
        return self._finish()

    # -- parsing ------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Decode what the buffer holds; hand the protocol what it must see."""
        buffer = self._buffer
        view = self._view
        protocol = self.protocol
        payloads = self._payloads
        texts = self._texts
        fast_limit = self._fast_limit
        start, end = self._start, self._end
        frames = 0
        self._need = 0
        try:
            while start < end:
                if self._owed:
                    start = self._hand_over(start, min(end, start + self._owed))
                    continue
                if self._through or protocol.state is not _OPEN:
                    self._through = True
                    start = self._hand_over(start + self._fed, end)
                    self._fed = 0
                    break
                if not self._fed and protocol.current_size is None:
                    # A run of common frames. Nothing in this loop calls the protocol, so
                    # its state, checked above, holds for the run: one check per run, not
                    # per frame (0.83 -> 0.65 us a message at 10 frames a read, 0.66 ->
                    # 0.50 at 100, ``python -m bench.chat_paths --paths code``). A header
                    # that is not complete yet cannot fail in the protocol either, so
                    # waiting for it changes nothing.
                    waiting = False
                    while start < end:
                        first = buffer[start]
                        if first != _FIN_TEXT and first != _FIN_BINARY:
                            break
                        if end - start < 2:
                            waiting = True
                            break
                        length = buffer[start + 1]
                        if not length & 0x80:
                            break  # unmasked: the protocol fails the connection on it
                        length &= 0x7F
                        if length < 126:
                            head = start + 6
                        elif length == 126:
                            if end - start < 4:
                                waiting = True
                                break
                            length = (buffer[start + 2] << 8) | buffer[start + 3]
                            head = start + 8
                        else:
                            if end - start < 10:
                                waiting = True
                                break
                            length = int.from_bytes(buffer[start + 2 : start + 10], "big")
                            head = start + 14
                        if length > fast_limit:
                            break
                        stop = head + length
                        if stop > end:
                            self._need = stop - start
                            waiting = True
                            break
                        if first == _FIN_TEXT:
                            texts.append(len(payloads))
                        payloads.append(apply_mask(view[head:stop], buffer[head - 4 : head]))
                        frames += 1
                        start = stop
                    if waiting or start == end:
                        break
                after = self._other_frame(start, end)
                if after is None:
                    break
                start = after
        finally:
            self._start = start
            self.frames += frames

    def _other_frame(self, start: int, end: int) -> int | None:
        """A frame the fast path does not take, at ``start``: hand it (or, if the protocol is
        bound to fail on it, everything) to the protocol. Returns where to go on from, or None
        to wait for more bytes."""
        buffer = self._buffer
        if end - start < 2:
            return None
        first, second = buffer[start], buffer[start + 1]
        if (first & 0x0F) not in _VALID_OPCODES or not second & 0x80:
            # An unknown opcode or an unmasked frame: the protocol fails on these two bytes.
            self._through = True
            end = self._hand_over(start + self._fed, end)
            self._fed = 0
            return end
        header = _header(buffer, start, end)
        if header is None:
            return None
        head, length = header
        current = self.protocol.current_size
        if length > self._limit - (current or 0):
            # Too big: the protocol fails on the header (1009).
            self._through = True
            end = self._hand_over(start + self._fed, end)
            self._fed = 0
            return end
        self._owed = head + length - self._fed
        self._frame = head + length
        start += self._fed
        self._fed = 0
        return self._hand_over(start, min(end, start + self._owed))

    def _hand_over(self, start: int, stop: int) -> int:
        """Give ``buffer[start:stop]`` to the protocol; collect what it made of it."""
        if stop > start:
            # receive_data appends to the protocol's own buffer: a view is enough, no copy.
            self.protocol.receive_data(cast(bytes, self._view[start:stop]))
            if self._owed:
                self._owed = max(0, self._owed - (stop - start))
            self._events(self.protocol.events_received())
        return stop

    def _events(self, events: list[Any]) -> None:
        """Assemble messages from the frames the protocol parsed (fragments joined)."""
        payloads = self._payloads
        for frame in events:
            if not isinstance(frame, Frame):
                continue
            self.frames += 1
            opcode = frame.opcode
            if opcode is _BINARY or opcode is _TEXT:
                if frame.fin:
                    if opcode is _TEXT:
                        self._texts.append(len(payloads))
                    payloads.append(cast(bytes, frame.data))
                else:
                    self._fragments = [cast(bytes, frame.data)]
                    self._fragment_bytes = len(frame.data)
                    self._fragment_is_text = opcode is _TEXT
            elif opcode is _CONT:
                self._fragments.append(cast(bytes, frame.data))
                self._fragment_bytes += len(frame.data)
                if frame.fin:
                    if self._fragment_is_text:
                        self._texts.append(len(payloads))
                    payloads.append(b"".join(self._fragments))
                    self._fragments = []
                    self._fragment_bytes = 0

    def _eof(self) -> None:
        """End of stream: the protocol gets what is left (a frame cut short) and the EOF."""
        protocol = self.protocol
        self._through = True
        start = self._start + self._fed
        if start < self._end:
            protocol.receive_data(cast(bytes, self._view[start : self._end]))
            self._events(protocol.events_received())
        self._start = self._end
        self._fed = self._owed = 0
        protocol.receive_eof()
        self._events(protocol.events_received())

    def _finish(self) -> list[bytes]:
        """This call's messages, after the UTF-8 check of its text messages."""
        payloads, texts = self._payloads, self._texts
        self._payloads, self._texts = [], []
        if texts:
            try:
                # A newline cannot complete a multi-byte sequence, so the joined text is valid
                # exactly when every message is: one C call per read.
                b"\n".join(
                    payloads if len(texts) == len(payloads) else [payloads[i] for i in texts]
                ).decode()
            except UnicodeDecodeError:
                for i in texts:
                    try:
                        payloads[i].decode()
                    except UnicodeDecodeError:
                        self.invalid_text = True
                        self._through = True
                        self.protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                        return payloads[:i]
        return payloads

    # -- the buffer ---------------------------------------------------------------------------

    def _resize(self, size: int) -> None:
        live = self._view[self._start : self._end]
        buffer = bytearray(size)
        buffer[: len(live)] = live
        self._buffer = buffer
        self._view = memoryview(buffer)
        self._end -= self._start
        self._start = 0

    def _compact(self) -> None:
        start, end = self._start, self._end
        self._view[: end - start] = self._view[start:end]
        self._start, self._end = 0, end - start

    def _shrink(self) -> None:
        """A quiet connection gives its grown buffer back."""
        if len(self._buffer) > self._initial:
            self._buffer = bytearray(self._initial)
            self._view = memoryview(self._buffer)
            self._start = self._end = 0
