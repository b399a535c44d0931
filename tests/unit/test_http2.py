"""The sans-IO HTTP/2 server layer, driven with raw frames: the DATA fast path's edge cases,
flow control, header blocks, SETTINGS, PING, limits, rapid reset; and a Hypothesis model that
cutting the same bytes into other reads never changes what the listener hears."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gateway.sources._http2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    OVER_BUDGET,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ErrorCode,
    Http2Error,
    Http2Server,
    StreamClosed,
    encode_headers,
    frame,
)

REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/p/M"),
    (":authority", "x"),
    ("content-type", "application/grpc"),
]


class Recorder:
    """A listener that writes down what it hears (and acknowledges nothing by itself)."""

    def __init__(self) -> None:
        self.heard: list[tuple[Any, ...]] = []

    def on_request(self, stream_id: int, headers: list[tuple[str, str]], end: bool) -> None:
        self.heard.append(("request", stream_id, dict(headers)[":path"], end))

    def on_data(self, stream_id: int, data: bytes, flow_len: int, end: bool) -> None:
        self.heard.append(("data", stream_id, data, flow_len, end))

    def on_end(self, stream_id: int) -> None:
        self.heard.append(("end", stream_id))

    def on_reset(self, stream_id: int) -> None:
        self.heard.append(("reset", stream_id))

    def on_refused(self, stream_id: int, reason: str) -> None:
        self.heard.append(("refused", stream_id, reason))

    def on_window(self) -> None:
        self.heard.append(("window",))

    def on_ping_ack(self, data: bytes) -> None:
        self.heard.append(("ping_ack", data))

    def on_goaway(self, last_stream_id: int) -> None:
        self.heard.append(("goaway", last_stream_id))


def server(**kw: Any) -> tuple[Http2Server, Recorder]:
    options: dict[str, Any] = {
        "max_concurrent_streams": 4,
        "stream_window": 1000,
        "connection_window": 100_000,
        "max_frame_size": 16384,
        "max_header_list_size": 1024,
        "max_resets": 10,
        "reset_window": 1.0,
        "clock": lambda: 0.0,
    }
    options.update(kw)
    recorder = Recorder()
    return Http2Server(recorder, **options), recorder


def settings_frame(**values: int) -> bytes:
    codes = {"initial_window": 4, "max_frame_size": 5, "header_table_size": 1}
    body = b"".join(struct.pack(">HL", codes[k], v) for k, v in values.items())
    return frame(SETTINGS, 0, 0, body)


def opened(h2: Http2Server, recorder: Recorder, *stream_ids: int, ack: bool = True) -> None:
    """Preface, settings (and the ack of ours), a request on each stream."""
    data = PREFACE + settings_frame() + (frame(SETTINGS, 0x1, 0) if ack else b"")
    encoder = hpack.Encoder()
    for stream_id in stream_ids:
        data += frame(HEADERS, END_HEADERS, stream_id, encoder.encode(REQUEST))
    h2.receive_data(data)
    h2.output.clear()
    recorder.heard.clear()


def parse(output: bytes | bytearray) -> list[tuple[int, int, int, bytes]]:
    frames = []
    data = bytes(output)
    while data:
        size = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9 : 9 + size]))
        data = data[9 + size :]
    return frames


def grpc(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


# -- DATA ------------------------------------------------------------------------------------------


def test_data_frames_split_across_reads_arrive_whole_and_in_order() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    data = frame(DATA, 0, 1, grpc(b"one")) + frame(DATA, END_STREAM, 1, grpc(b"two"))
    for i in range(len(data)):
        h2.receive_data(data[i : i + 1])
    assert rec.heard == [
        ("data", 1, grpc(b"one"), 8, False),
        ("data", 1, grpc(b"two"), 8, True),
    ]
    assert h2.partial_bytes == 0


def test_padding_is_removed_and_counted_in_flow_control() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    body = grpc(b"hi")
    h2.receive_data(frame(DATA, PADDED, 1, bytes((10,)) + body + bytes(10)))
    assert rec.heard == [("data", 1, body, 1 + len(body) + 10, False)]
    assert h2.streams[1].in_window == 1000 - 18


def test_padding_longer_than_the_frame_is_a_connection_error() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    with pytest.raises(Http2Error) as caught:
        h2.receive_data(frame(DATA, PADDED, 1, b"\x05abc"))
    assert caught.value.code == ErrorCode.PROTOCOL_ERROR
    assert parse(h2.output)[-1][0] == GOAWAY


def test_a_frame_with_several_messages_and_a_message_across_frames_pass_as_they_come() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    several = grpc(b"a") + grpc(b"b") + grpc(b"c")
    big = grpc(b"z" * 300)
    h2.receive_data(
        frame(DATA, 0, 1, several) + b"".join(frame(DATA, 0, 1, big[i : i + 7]) for i in (0, 7))
    )
    assert [item[2] for item in rec.heard] == [several, big[:7], big[7:14]]


def test_the_stream_window_is_enforced_and_reopened_in_bulk() -> None:
    h2, rec = server()
    opened(h2, rec, 1, 3)
    h2.receive_data(frame(DATA, 0, 1, bytes(1000)))  # the whole window
    assert h2.streams[1].in_window == 0
    h2.acknowledge(1, 100)  # the window is low: given back at once
    (update,) = parse(h2.output)
    assert update[:3] == (WINDOW_UPDATE, 0, 1) and int.from_bytes(update[3], "big") == 100
    h2.output.clear()
    h2.receive_data(frame(DATA, 0, 1, bytes(101)))  # past the stream's window
    assert ("reset", 1) in rec.heard and 1 not in h2.streams
    kind, _, stream_id, body = parse(h2.output)[0]
    assert (kind, stream_id, body) == (RST_STREAM, 1, struct.pack(">L", 3))
    h2.receive_data(frame(DATA, 0, 3, b"still fine"))  # the connection lives
    assert rec.heard[-1][:3] == ("data", 3, b"still fine")


def test_a_stream_window_opened_past_the_initial_one_and_the_stream_only_acknowledged() -> None:
    h2, rec = server()
    opened(h2, rec, 1, 3)
    h2.open_window(1, 4000)  # one stream may send more than the initial window
    (update,) = parse(h2.output)
    assert update[:3] == (WINDOW_UPDATE, 0, 1) and int.from_bytes(update[3], "big") == 4000
    h2.output.clear()
    h2.receive_data(frame(DATA, 0, 1, bytes(5000)))
    assert rec.heard[-1][3] == 5000 and h2.streams[1].in_window == 0
    h2.receive_data(frame(DATA, 0, 3, bytes(1000)))
    h2.acknowledge(0, 1000)  # the connection's window, at once
    h2.acknowledge(3, 1000, connection=False)  # the stream's, later
    assert [(f[2], int.from_bytes(f[3], "big")) for f in parse(h2.output)] == [(3, 1000)]
    assert h2._in_pending == 1000  # given back once, not twice
    h2.open_window(7, 100)  # no such stream: nothing
    h2.open_window(3, 0)
    assert len(parse(h2.output)) == 1


def test_window_updates_earned_by_a_read_go_out_once_at_its_end() -> None:
    h2, rec = server(stream_window=100_000)
    opened(h2, rec, 1)

    class Acking(Recorder):
        def on_data(self, stream_id: int, data: bytes, flow_len: int, end: bool) -> None:
            h2.acknowledge(stream_id, flow_len)

    h2._listener = acking = Acking()
    h2._on_data = acking.on_data
    h2.receive_data(b"".join(frame(DATA, 0, 1, bytes(1000)) for _ in range(30)))
    updates = [f for f in parse(h2.output) if f[0] == WINDOW_UPDATE]
    assert [(f[2], int.from_bytes(f[3], "big")) for f in updates] == [(0, 30_000), (1, 30_000)]


def test_the_connection_window_is_enforced() -> None:
    h2, rec = server(connection_window=65535, stream_window=1 << 20, max_frame_size=1 << 20)
    opened(h2, rec, 1)
    with pytest.raises(Http2Error) as caught:
        h2.receive_data(frame(DATA, 0, 1, bytes(65536)))
    assert caught.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_before_our_settings_are_acked_the_default_window_applies() -> None:
    h2, rec = server(stream_window=100)
    opened(h2, rec, 1, ack=False)
    h2.receive_data(frame(DATA, 0, 1, bytes(5000)))  # within RFC 9113's 65,535
    assert rec.heard[-1][3] == 5000
    h2.receive_data(frame(SETTINGS, 0x1, 0))
    assert h2.streams[1].in_window == 100 - 5000


def test_data_on_a_closed_stream_is_dropped_and_the_connection_window_returned() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    h2.reset_stream(1, ErrorCode.CANCEL)
    h2.output.clear()
    h2.receive_data(frame(DATA, 0, 1, bytes(500)))
    assert rec.heard == [] and h2._in_pending == 500


def test_data_on_an_idle_stream_or_stream_0_breaks_the_connection() -> None:
    for stream_id in (0, 9):
        h2, rec = server()
        opened(h2, rec, 1)
        with pytest.raises(Http2Error):
            h2.receive_data(frame(DATA, 0, stream_id, b"x"))


# -- HEADERS, CONTINUATION, streams ----------------------------------------------------------------


def test_a_header_block_across_continuations_and_with_priority_and_padding() -> None:
    h2, rec = server()
    opened(h2, rec)
    block = hpack.Encoder().encode(REQUEST)
    first = bytes((3,)) + bytes(5) + block[:4] + bytes(3)  # pad length, priority, fragment, pad
    data = frame(HEADERS, PADDED | PRIORITY_FLAG | END_STREAM, 1, first)
    data += frame(CONTINUATION, 0, 1, block[4:9]) + frame(CONTINUATION, END_HEADERS, 1, block[9:])
    h2.receive_data(data)
    assert rec.heard == [("request", 1, "/p/M", True)]


def test_a_header_block_interrupted_or_too_long_breaks_the_connection() -> None:
    h2, rec = server()
    opened(h2, rec)
    with pytest.raises(Http2Error) as caught:
        h2.receive_data(frame(HEADERS, 0, 1, b"\x82") + frame(PING, 0, 0, bytes(8)))
    assert caught.value.reason == "malformed"
    h2, rec = server()
    opened(h2, rec)
    flood = frame(HEADERS, 0, 1, b"") + frame(CONTINUATION, 0, 1, b"") * 100
    with pytest.raises(Http2Error) as caught:
        h2.receive_data(flood)
    assert (caught.value.reason, caught.value.code) == ("oversize", ErrorCode.ENHANCE_YOUR_CALM)


def test_a_stream_past_the_concurrency_limit_is_refused_and_the_connection_lives() -> None:
    h2, rec = server(max_concurrent_streams=2)
    opened(h2, rec, 1, 3)
    encoder_state = hpack.Encoder()
    h2.receive_data(frame(HEADERS, END_HEADERS, 5, encoder_state.encode(REQUEST)))
    assert rec.heard == [("refused", 5, "too_many_streams")]
    assert parse(h2.output) == [(RST_STREAM, 0, 5, struct.pack(">L", ErrorCode.REFUSED_STREAM))]
    h2.reset_stream(1, ErrorCode.CANCEL)
    h2.receive_data(frame(HEADERS, END_HEADERS, 7, encoder_state.encode(REQUEST)))
    assert rec.heard[-1] == ("request", 7, "/p/M", False)


def test_repeated_indexed_header_blocks_are_decoded_once() -> None:
    h2, rec = server(max_concurrent_streams=100)
    opened(h2, rec)
    encoder = hpack.Encoder()
    first = encoder.encode(REQUEST)  # adds entries to the dynamic table
    again = encoder.encode(REQUEST)  # indexed fields only
    assert encoder.encode(REQUEST) == again
    h2.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, first))
    h2.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 3, again))
    assert h2._decoded == {again: h2._decoded[again]}
    h2.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 5, again))
    assert [item[:3] for item in rec.heard] == [("request", n, "/p/M") for n in (1, 3, 5)]


def test_trailers_end_the_stream_and_bad_ones_reset_it() -> None:
    h2, rec = server()
    opened(h2, rec, 1, 3)
    h2.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, b""))
    h2.receive_data(frame(HEADERS, END_HEADERS, 3, b""))  # trailers must end the stream
    assert rec.heard == [("end", 1), ("reset", 3)]


def test_rapid_reset_ends_the_connection_with_enhance_your_calm() -> None:
    now = [0.0]
    h2, rec = server(max_resets=10, max_concurrent_streams=1000, clock=lambda: now[0])
    opened(h2, rec)
    encoder = hpack.Encoder()

    def pairs(first: int, count: int) -> bytes:
        return b"".join(
            frame(HEADERS, END_HEADERS, sid, encoder.encode(REQUEST))
            + frame(RST_STREAM, 0, sid, struct.pack(">L", ErrorCode.CANCEL))
            for sid in range(first, first + 2 * count, 2)
        )

    h2.receive_data(pairs(1, 10))
    now[0] = 5.0  # a new window: the count starts again
    h2.receive_data(pairs(21, 10))
    with pytest.raises(Http2Error) as caught:
        h2.receive_data(pairs(41, 300))  # > 256 pairs in one write
    assert (caught.value.reason, caught.value.code) == ("rapid_reset", ErrorCode.ENHANCE_YOUR_CALM)
    goaway = parse(h2.output)[-1]
    assert goaway[0] == GOAWAY and goaway[3][4:] == struct.pack(">L", ErrorCode.ENHANCE_YOUR_CALM)
    assert int.from_bytes(goaway[3][:4], "big") == h2.highest_stream_id


# -- SETTINGS, PING, GOAWAY, unknown frames, limits ------------------------------------------------


def test_settings_are_acked_and_the_initial_window_moves_open_streams() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    before = h2.send_window(1)
    h2.receive_data(settings_frame(initial_window=70000, max_frame_size=20000))
    assert parse(h2.output) == [(SETTINGS, 0x1, 0, b"")]
    assert h2.streams[1].out_window == 70000 and h2.remote_max_frame_size == 20000
    assert (before, h2.send_window(1)) == (16384, 20000)
    with pytest.raises(Http2Error):
        h2.receive_data(settings_frame(max_frame_size=100))


def test_ping_is_answered_and_ping_acks_reported() -> None:
    h2, rec = server()
    opened(h2, rec)
    h2.receive_data(frame(PING, 0, 0, b"12345678") + frame(PING, 0x1, 0, b"abcdefgh"))
    assert parse(h2.output) == [(PING, 0x1, 0, b"12345678")]
    assert rec.heard == [("ping_ack", b"abcdefgh")]
    with pytest.raises(Http2Error):
        h2.receive_data(frame(PING, 0, 0, b"short"))


def test_unknown_frames_and_priority_are_ignored_goaway_reported() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    h2.receive_data(
        frame(0xFA, 0xFF, 1, b"whatever")
        + frame(PRIORITY, 0, 1, bytes(5))
        + frame(GOAWAY, 0, 0, struct.pack(">LL", 1, 0))
    )
    assert rec.heard == [("goaway", 1)] and h2.output == bytearray()


def test_our_goaway_carries_its_debug_data() -> None:
    h2, rec = server()
    opened(h2, rec, 1, 3)
    h2.output.clear()
    h2.goaway(h2.highest_stream_id, ErrorCode.ENHANCE_YOUR_CALM, OVER_BUDGET)
    ((kind, flags, stream_id, payload),) = parse(h2.output)
    assert (kind, flags, stream_id) == (GOAWAY, 0, 0)
    assert payload == struct.pack(">LL", 3, ErrorCode.ENHANCE_YOUR_CALM) + OVER_BUDGET


def test_a_frame_over_our_max_frame_size_is_refused_from_its_header() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    with pytest.raises(Http2Error) as caught:
        h2.receive_data(frame(DATA, 0, 1, bytes(16385))[:20])
    assert (caught.value.reason, caught.value.code) == ("oversize", ErrorCode.FRAME_SIZE_ERROR)


def test_a_bad_preface_or_first_frame_is_refused() -> None:
    for data in (b"GET / HTTP/1.1\r\n", PREFACE + frame(PING, 0, 0, bytes(8))):
        h2, _ = server()
        with pytest.raises(Http2Error) as caught:
            h2.receive_data(data)
        assert caught.value.reason == "malformed"


# -- output ----------------------------------------------------------------------------------------


def test_headers_data_and_trailers_out_and_a_closed_stream_refuses_more() -> None:
    h2, rec = server()
    opened(h2, rec, 1)
    h2.receive_data(frame(DATA, END_STREAM, 1, grpc(b"x")))
    h2.output.clear()
    h2.send_headers(1, encode_headers([(":status", "200")]))
    h2.send_data(1, b"reply")
    h2.send_headers(
        1, encode_headers([("grpc-status", "0"), ("x-" + "a" * 200, "b" * 20000)]), end_stream=True
    )
    frames = parse(h2.output)
    assert [f[0] for f in frames] == [HEADERS, DATA, HEADERS, CONTINUATION]
    decoder = hpack.Decoder()
    assert decoder.decode(frames[0][3]) == [(":status", "200")]
    trailers = decoder.decode(b"".join(f[3] for f in frames[2:]))
    assert trailers[0] == ("grpc-status", "0") and trailers[1][1] == "b" * 20000
    assert 1 not in h2.streams
    with pytest.raises(StreamClosed):
        h2.send_data(1, b"late")


# -- any cut of the same bytes ---------------------------------------------------------------------


def _client_bytes(ops: list[tuple[int, int, int]]) -> bytes:
    encoder = hpack.Encoder()
    data = PREFACE + settings_frame() + frame(SETTINGS, 0x1, 0)
    next_id = 1
    for kind, size, flags in ops:
        if kind == 0 or next_id == 1:
            data += frame(HEADERS, END_HEADERS, next_id, encoder.encode(REQUEST))
            next_id += 2
        elif kind == 1:
            body = grpc(bytes(size))
            if flags & 1:
                body = bytes((3,)) + body + bytes(3)
            data += frame(DATA, PADDED if flags & 1 else 0, next_id - 2, body)
        elif kind == 2:
            data += frame(PING, 0, 0, bytes(8))
        else:
            data += frame(0xEE, flags, 0, bytes(size))
    return data


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 3)), max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_any_cut_of_the_same_bytes_is_heard_the_same(
    ops: list[tuple[int, int, int]], cuts: list[int]
) -> None:
    data = _client_bytes(ops)
    heard = []
    for points in ([], cuts):
        h2, rec = server(max_concurrent_streams=100, stream_window=1 << 20)
        bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in points)})
        for start, end in itertools.pairwise(bounds):
            h2.receive_data(data[start:end])
        assert h2.partial_bytes == 0
        heard.append([item for item in rec.heard if item != ("window",)])
    assert heard[0] == heard[1]


def test_a_read_that_completes_a_frame_is_progress_even_if_it_ends_inside_the_next() -> None:
    """What the slowloris clock watches: a busy stream's reads rarely end on a frame
    boundary, a trickle completes nothing, and an open header block is never progress."""
    h2, rec = server()
    opened(h2, rec, 1)
    frames = frame(DATA, 0, 1, grpc(b"a" * 20)) * 2
    h2.receive_data(frames[:40])  # the first frame and part of the second
    assert h2.stalled_bytes == 0 and h2.partial_bytes == 40 - 34
    h2.receive_data(frames[40:50])  # completes nothing
    assert h2.stalled_bytes == h2.partial_bytes == 16
    block = hpack.Encoder().encode(REQUEST)
    h2.receive_data(frames[50:] + frame(HEADERS, 0, 3, block[:3]))
    assert h2.stalled_bytes == 3  # frames completed, but a header block is open
    h2.receive_data(frame(CONTINUATION, 0, 3, block[3:5]))
    assert h2.stalled_bytes == 5
    h2.receive_data(frame(CONTINUATION, END_HEADERS, 3, block[5:]))
    assert h2.stalled_bytes == 0 and rec.heard[-1][:2] == ("request", 3)


def test_an_hpack_bomb_is_refused_as_oversize() -> None:
    """A small block that decodes to a huge header list (one large table entry, indexed
    again and again) is refused before the list is built."""
    h2, rec = server(max_header_list_size=1024)
    opened(h2, rec)
    encoder = hpack.Encoder()
    first = encoder.encode([("x-big", "v" * 900)])  # inserted into the dynamic table
    bomb = first + encoder.encode([("x-big", "v" * 900)]) * 50  # 50 one-byte references
    with pytest.raises(Http2Error) as caught:
        h2.receive_data(frame(HEADERS, END_HEADERS, 1, bomb))
    assert (caught.value.reason, caught.value.code) == ("oversize", ErrorCode.ENHANCE_YOUR_CALM)
