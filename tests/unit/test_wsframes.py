"""MessageReader (the WebSocket source's frame reader) against websockets' own protocol.

The reference is the plain :class:`~websockets.server.ServerProtocol` fed every read, with the
messages assembled from its frame events (fragments joined, text checked as UTF-8 once per
read): what the source did before it decoded the common frames itself. For any bytes, cut into
reads anywhere, the reader must give the same messages in the same reads, complete the same
frames per read (the slowloris clock), send the same bytes back (pongs, close frames) and leave
the protocol in the same state with the same error.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from trio_gateway.sources._wsframes import MessageReader, frame_boundary

REQUEST = (
    b"GET / HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
LIMIT = 2000
MASK = b"\x37\xfa\x21\x3d"


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    form: str = "minimal",
    key: bytes = MASK,
) -> bytes:
    """A client frame, any flags, any length encoding (valid or not)."""
    out = bytes([fin << 7 | rsv << 4 | opcode])
    n = len(payload)
    if form == "64" or (form == "minimal" and n >= 1 << 16):
        out += bytes([masked << 7 | 127]) + struct.pack(">Q", n)
    elif form == "16" or (form == "minimal" and n >= 126):
        out += bytes([masked << 7 | 126]) + struct.pack(">H", n)
    else:
        out += bytes([masked << 7 | n])
    if masked:
        out += key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    else:
        out += payload
    return out


def binary(payload: bytes, **kw: Any) -> bytes:
    return frame(0x2, payload, **kw)


def text(payload: bytes, **kw: Any) -> bytes:
    return frame(0x1, payload, **kw)


def open_protocol(behind: bytes = b"", limit: int = LIMIT) -> tuple[ServerProtocol, list[Any]]:
    """A server protocol past its handshake; ``behind`` came in the request's read."""
    protocol = ServerProtocol(max_size=limit)
    protocol.receive_data(REQUEST + behind)
    events = protocol.events_received()
    assert isinstance(events[0], Request)
    protocol.send_response(protocol.accept(events[0]))
    protocol.data_to_send()
    return protocol, events[1:]


@dataclass
class Outcome:
    reads: list[list[bytes]]  # the messages of each read
    frames: list[int]  # frames completed per read
    sent: bytes  # everything the server wrote after the handshake
    state: State
    close_sent: int | None
    close_rcvd: int | None
    error: type[Exception] | None


def outcome(
    protocol: ServerProtocol, reads: list[list[bytes]], frames: list[int], sent: bytes
) -> Outcome:
    return Outcome(
        reads,
        frames,
        sent,
        protocol.state,
        protocol.close_sent.code if protocol.close_sent else None,
        protocol.close_rcvd.code if protocol.close_rcvd else None,
        type(protocol.parser_exc) if protocol.parser_exc else None,
    )


def reference(behind: bytes, reads: list[bytes], limit: int = LIMIT) -> Outcome | None:
    """The protocol fed every read (b"" = end of stream), messages assembled from its events."""
    protocol, early = open_protocol(behind, limit)
    if protocol.eof_sent:
        return None  # the source answers 400 to this handshake
    fragments: list[bytes] = []
    fragment_text = [False]

    def messages(events: list[Any]) -> tuple[list[bytes], int]:
        payloads: list[bytes] = []
        texts: list[int] = []
        count = 0
        for event in events:
            if not isinstance(event, Frame):
                continue
            count += 1
            if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                if event.fin:
                    if event.opcode is Opcode.TEXT:
                        texts.append(len(payloads))
                    payloads.append(bytes(event.data))
                else:
                    fragments[:] = [bytes(event.data)]
                    fragment_text[0] = event.opcode is Opcode.TEXT
            elif event.opcode is Opcode.CONT:
                fragments.append(bytes(event.data))
                if event.fin:
                    if fragment_text[0]:
                        texts.append(len(payloads))
                    payloads.append(b"".join(fragments))
                    fragments.clear()
        for i in texts:
            try:
                payloads[i].decode()
            except UnicodeDecodeError:
                protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                return payloads[:i], count
        return payloads, count

    first, count = messages(early + protocol.events_received())
    out, frames = [first], [count]
    sent = b"".join(protocol.data_to_send())
    for data in reads:
        if protocol.eof_sent:
            break
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        payloads, count = messages(protocol.events_received())
        out.append(payloads)
        frames.append(count)
        sent += b"".join(protocol.data_to_send())
    return outcome(protocol, out, frames, sent)


def through_reader(
    behind: bytes,
    chunks: list[bytes],
    *,
    use_feed: bool = False,
    limit: int = LIMIT,
    **options: Any,
) -> tuple[Outcome, list[bytes]]:
    """The reader fed ``chunks`` as the source does (then end of stream). Returns its outcome
    and the reads it actually made (a read gets at most the buffer's free space)."""
    protocol, early = open_protocol(behind, limit)
    reader = MessageReader(protocol, behind_handshake=behind, **options)
    out = [reader.take_events(early + protocol.events_received())]
    frames = [reader.frames]
    sent = b"".join(protocol.data_to_send())
    reads: list[bytes] = []
    for chunk in [*chunks, b""]:
        view = memoryview(chunk)
        while True:
            if protocol.eof_sent:
                break
            if use_feed:
                data = bytes(view)
                view = view[len(view) :]
                out.append(reader.feed(data))
            else:
                space = reader.read_buffer()
                assert len(space) > 0
                n = min(len(space), len(view))
                space[:n] = view[:n]
                data = bytes(view[:n])
                view = view[n:]
                out.append(reader.received(n))
            reads.append(data)
            frames.append(reader.frames)
            # Only a connection that is closing or failed passes every byte to the protocol:
            # anything else would mean the reader lost track of the frame boundaries.
            assert not reader.passing_through or protocol.state is not State.OPEN
            sent += b"".join(protocol.data_to_send())
            if not view:
                break
        if protocol.eof_sent:
            break
    return outcome(protocol, out, frames, sent), reads


def check(stream: bytes, cuts: list[int] = (), behind: int = 0, **options: Any) -> Outcome:  # type: ignore[assignment]
    """Run the reader on ``stream`` cut at ``cuts`` (the first ``behind`` bytes arrive with the
    handshake) and compare with the reference on the same reads."""
    head, body = stream[:behind], stream[behind:]
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    chunks = [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    expected_handshake = reference(head, [], options.get("limit", LIMIT))
    if expected_handshake is None:
        return cast(Outcome, None)
    got, reads = through_reader(head, chunks, **options)
    expected = reference(head, reads, options.get("limit", LIMIT))
    assert expected is not None
    assert got == expected
    return got


def all_messages(result: Outcome) -> list[bytes]:
    return [m for read in result.reads for m in read]


# -- the common frames ---------------------------------------------------------------------------


def test_binary_and_text_frames_every_length_form() -> None:
    payloads = [b"", b"x", b"y" * 125, b"z" * 126, b"w" * 1000]
    stream = b"".join(binary(p) + text(p) for p in payloads)
    stream += binary(b"16-bit form", form="16") + binary(b"64-bit form", form="64")
    result = check(stream)
    assert all_messages(result) == [p for p in payloads for _ in (0, 1)] + [
        b"16-bit form",
        b"64-bit form",
    ]
    assert result.sent == b""  # nothing to answer; the stream then ends without a close


@pytest.mark.parametrize("size", [0, 5, 125, 126, 300, 1999])
def test_every_split_point(size: int) -> None:
    """Two frames and a ping, cut once at every byte: same messages, same frames per read."""
    stream = binary(b"a" * size) + frame(0x9, b"ping!") + text("é".encode() * (size // 2))
    for cut in range(len(stream) + 1):
        check(stream, [cut])


def test_byte_by_byte() -> None:
    stream = binary(b"one") + text(b"two" * 50) + binary(b"three" * 30, form="64")
    result = check(stream, list(range(len(stream))))
    assert all_messages(result) == [b"one", b"two" * 50, b"three" * 30]


def test_a_read_can_hold_many_frames() -> None:
    frames = [binary(b"%d" % i) for i in range(5000)]
    result = check(b"".join(frames), initial_buffer=1 << 16)
    assert all_messages(result) == [b"%d" % i for i in range(5000)]


# -- frames handed to the protocol ---------------------------------------------------------------


def test_ping_gets_its_pong_between_messages() -> None:
    result = check(binary(b"a") + frame(0x9, b"hello") + binary(b"b"))
    assert all_messages(result) == [b"a", b"b"]
    assert result.sent == Frame(Opcode.PONG, b"hello").serialize(mask=False, extensions=[])


def test_fragmented_message_with_a_ping_inside() -> None:
    stream = (
        text(b"frag", fin=False)
        + frame(0x9, b"p")
        + frame(0x0, b"men", fin=False)
        + frame(0x0, b"ted", fin=True)
        + binary(b"after")
    )
    for cut in range(len(stream) + 1):
        result = check(stream, [cut])
        assert all_messages(result) == [b"fragmented", b"after"]


def test_close_frame_ends_it_and_what_follows_is_discarded() -> None:
    stream = binary(b"before") + frame(0x8, struct.pack(">H", 1000) + b"bye") + binary(b"after")
    result = check(stream)
    assert all_messages(result) == [b"before"]
    assert result.close_rcvd == result.close_sent == 1000  # echoed, then the server hangs up


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (binary(b"x", masked=False), 1002),
        (frame(0x3, b"reserved opcode"), 1002),
        (binary(b"rsv", rsv=4), 1002),
        (frame(0x9, b"p" * 126), 1002),  # control frame too long
        (frame(0x9, b"p", fin=False), 1002),  # fragmented control frame
        (frame(0x0, b"no message to continue"), 1002),
        (binary(b"o" * (LIMIT + 1)), 1009),
        (text(b"bad \xc3("), 1007),
    ],
)
def test_bad_frames_close_as_websockets_does(bad: bytes, code: int) -> None:
    stream = binary(b"good") + bad + binary(b"never")
    for cut in range(len(stream) + 1):
        result = check(stream, [cut])
        assert all_messages(result) == [b"good"]
        assert result.close_sent == code


def test_oversize_closes_on_the_header() -> None:
    """websockets fails as soon as the length is known: no need to send the payload."""
    header = binary(b"o" * (LIMIT + 1))[:4]
    protocol, _ = open_protocol()
    reader = MessageReader(protocol)
    space = reader.read_buffer()
    space[: len(header)] = header
    assert reader.received(len(header)) == []
    assert protocol.close_sent is not None and protocol.close_sent.code == 1009


def test_oversize_in_fragments() -> None:
    stream = binary(b"f" * 1200, fin=False) + frame(0x0, b"f" * 1200)
    assert check(stream).close_sent == 1009


def test_invalid_utf8_keeps_earlier_messages_of_the_read() -> None:
    protocol, _ = open_protocol()
    reader = MessageReader(protocol)
    result = reader.feed(text(b"fine") + binary(b"\xff ok") + text(b"bad \xc3(") + binary(b"lost"))
    assert result == [b"fine", b"\xff ok"]
    assert reader.invalid_text
    assert protocol.close_sent is not None and protocol.close_sent.code == 1007


def test_end_of_stream_inside_a_frame() -> None:
    result = check(binary(b"t" * 100)[:20])
    assert result.error is EOFError and result.state is State.CLOSED


def test_frames_larger_than_the_buffer_go_through_the_protocol() -> None:
    big = bytes(range(256)) * 7
    stream = binary(b"small") + binary(big) + text(b"small again")
    for cut in (0, 3, 10, 600, 1500, len(stream) - 1):
        result = check(stream, [cut], max_buffer=512, initial_buffer=64)
        assert all_messages(result) == [b"small", big, b"small again"]


def test_closing_by_the_server_hands_everything_to_the_protocol() -> None:
    """After our close frame (gateway stopping) the client's messages still arrive, through
    websockets, until its close frame."""
    protocol, _ = open_protocol()
    reader = MessageReader(protocol)
    partial = binary(b"in flight")
    assert reader.feed(partial[:5]) == []
    protocol.send_close(CloseCode.GOING_AWAY, "stopping")
    closing = frame(0x8, struct.pack(">H", 1000))
    assert reader.feed(partial[5:] + binary(b"late") + closing) == [b"in flight", b"late"]
    assert protocol.close_rcvd is not None and protocol.eof_sent


# -- frames behind the handshake -----------------------------------------------------------------


def test_frame_boundary() -> None:
    frames = binary(b"a" * 10) + binary(b"b" * 200)
    assert frame_boundary(frames) == len(frames)
    for cut in range(len(frames)):
        assert frame_boundary(frames[:cut]) == (0 if cut < 16 else 16)


@pytest.mark.parametrize("behind", range(0, 40))
def test_a_frame_begun_behind_the_request(behind: int) -> None:
    """The request's read carried the first bytes of the stream (already in the protocol)."""
    stream = binary(b"first" * 3) + binary(b"second" * 30) + frame(0x9, b"p") + text(b"third")
    result = check(stream, [behind + 7], behind=behind)
    assert all_messages(result) == [b"first" * 3, b"second" * 30, b"third"]


# -- the buffer ----------------------------------------------------------------------------------


def test_buffer_grows_while_reads_fill_it_and_shrinks_when_quiet() -> None:
    protocol, _ = open_protocol(limit=1 << 20)
    reader = MessageReader(protocol, initial_buffer=1024, max_buffer=8192)
    stream = binary(b"m" * 300) * 200
    view = memoryview(stream)
    sizes = []
    got: list[bytes] = []
    while view:
        space = reader.read_buffer()
        sizes.append(reader.capacity)
        n = min(len(space), len(view))
        space[:n] = view[:n]
        view = view[n:]
        got += reader.received(n)
    assert got == [b"m" * 300] * 200
    assert sizes[0] == 1024 and max(sizes) == 8192
    assert all(b >= a for a, b in itertools.pairwise(sizes))  # grew, never shrank while busy
    space = reader.read_buffer()
    message = binary(b"quiet")
    space[: len(message)] = message
    assert reader.received(len(message)) == [b"quiet"]
    assert reader.capacity == 1024


def test_a_frame_waiting_for_its_payload_gets_room_as_it_arrives() -> None:
    """A header announcing a large frame does not buy a large buffer; half the frame does."""
    protocol, _ = open_protocol(limit=1 << 20)
    reader = MessageReader(protocol, initial_buffer=1024, max_buffer=1 << 16)
    big = binary(b"B" * 40_000)
    assert reader.feed(big[:100]) == []
    reader.read_buffer()
    assert reader.capacity == 1024
    assert reader.feed(big[100:20_100]) == []
    assert len(reader.read_buffer()) >= len(big) - 20_100
    assert reader.capacity < 1 << 16
    assert reader.feed(big[20_100:]) == [b"B" * 40_000]


# -- any bytes, any reads ------------------------------------------------------------------------

keys = st.binary(min_size=4, max_size=4)


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """Mostly well-formed client traffic (messages, fragments, pings, a close), now and then a
    malformed or oversize frame."""
    out = b""
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(
            st.sampled_from(
                ["binary", "binary", "text", "text", "fragments", "ping", "pong", "close", "raw"]
            )
        )
        form = draw(st.sampled_from(["minimal", "minimal", "16", "64"]))
        key = draw(keys)
        if kind == "binary":
            size = draw(st.sampled_from([0, 1, 17, 125, 126, 700, 1500, LIMIT, LIMIT + 1]))
            out += binary(draw(st.binary(min_size=size, max_size=size)), form=form, key=key)
        elif kind == "text":
            if draw(st.integers(0, 9)):
                payload = draw(st.text(max_size=300)).encode()
            else:
                payload = draw(st.binary(max_size=20))  # maybe not UTF-8
            out += text(payload, form=form, key=key)
        elif kind == "fragments":
            opcode = draw(st.sampled_from([0x1, 0x2]))
            parts = draw(st.lists(st.text(max_size=400).map(str.encode), min_size=1, max_size=4))
            broken = not draw(st.integers(0, 5))  # the last fragment never comes
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if last and broken and i:
                    break
                fin = last and not broken
                out += frame(opcode if i == 0 else 0x0, part, fin=fin, form=form, key=key)
                if not last and draw(st.booleans()):
                    out += frame(0x9, b"in between", key=key)
        elif kind in ("ping", "pong"):
            payload = draw(st.binary(max_size=125))
            out += frame(0x9 if kind == "ping" else 0xA, payload, form=form, key=key)
        elif kind == "close":
            out += frame(0x8, struct.pack(">H", 1000) + b"bye", key=key)
        else:
            payload = draw(st.binary(max_size=200))
            out += frame(
                draw(st.integers(0, 15)),
                payload,
                fin=draw(st.booleans()),
                rsv=draw(st.sampled_from([0, 0, 0, 1, 4])),
                masked=draw(st.sampled_from([True, True, True, False])),
                form=form,
                key=key,
            )
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=frame_streams(),
    cuts=st.lists(st.integers(0, 20_000), max_size=12),
    behind=st.sampled_from([0, 0, 0, 1, 2, 7, 30, 200]),
    max_buffer=st.sampled_from([64, 512, 4096, 1 << 20]),
    use_feed=st.booleans(),
)
def test_same_as_websockets_for_any_traffic_cut_anywhere(
    stream: bytes, cuts: list[int], behind: int, max_buffer: int, use_feed: bool
) -> None:
    check(
        stream,
        cuts,
        behind=min(behind, len(stream)),
        max_buffer=max_buffer,
        initial_buffer=min(64, max_buffer),
        use_feed=use_feed,
    )


@settings(max_examples=200, deadline=None)
@given(noise=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_same_as_websockets_for_noise(noise: bytes, cuts: list[int]) -> None:
    check(binary(b"ok") + noise, cuts)
