"""The sans-IO codecs, fed bytes alone: every split point, the limits, end of stream, fuzzing."""

from __future__ import annotations

import ast
import contextlib
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_gateway.codecs as codecs
from trio_gateway._errors import ConfigurationError, FrameTooLarge, ProtocolError
from trio_gateway.codecs import (
    FRAMINGS,
    Decoder,
    GrpcMessageDecoder,
    LengthPrefixDecoder,
    NewlineDecoder,
    encode_grpc_message,
    encode_length_prefixed,
    encode_newline,
)

PAYLOADS = [b"a", b'{"seq":1}', b"x" * 300, b"\x00\x01\xff", b"last one"]


def feed_chunks(decoder: Decoder[Any], data: bytes, sizes: Sequence[int]) -> list[Any]:
    """Feed ``data`` cut into pieces of ``sizes`` (cycled), then close; all frames in order."""
    out: list[Any] = []
    pos, i = 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        out += decoder.feed(data[pos : pos + step])
        pos += step
        i += 1
    out += decoder.close()
    return out


def split_at(decoder: Decoder[Any], data: bytes, cut: int) -> list[Any]:
    return decoder.feed(data[:cut]) + decoder.feed(data[cut:]) + decoder.close()


def grpc_stream(messages: Sequence[tuple[bool, bytes]]) -> bytes:
    return b"".join(encode_grpc_message(payload, flag) for flag, payload in messages)


GRPC_MESSAGES = [(False, p) for p in PAYLOADS] + [(True, b"zipped"), (False, b"")]

CASES: list[tuple[str, Callable[[], Decoder[Any]], bytes, list[Any]]] = [
    ("newline", NewlineDecoder, encode_newline(PAYLOADS), PAYLOADS),
    ("length", LengthPrefixDecoder, encode_length_prefixed([*PAYLOADS, b""]), [*PAYLOADS, b""]),
    ("grpc", GrpcMessageDecoder, grpc_stream(GRPC_MESSAGES), GRPC_MESSAGES),
]
CASE_IDS = [case[0] for case in CASES]


# -- every split point -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "make", "data", "expected"), CASES, ids=CASE_IDS)
def test_every_single_split_point(
    name: str, make: Callable[[], Decoder[Any]], data: bytes, expected: list[Any]
) -> None:
    for cut in range(len(data) + 1):
        assert split_at(make(), data, cut) == expected, f"split at {cut}"


@pytest.mark.parametrize(("name", "make", "data", "expected"), CASES, ids=CASE_IDS)
def test_every_pair_of_split_points(
    name: str, make: Callable[[], Decoder[Any]], data: bytes, expected: list[Any]
) -> None:
    # Three pieces: catches state that survives one boundary but not two (header split from
    # body, body split twice). Skip the 300-byte middle to keep it quick.
    points = [i for i in range(len(data) + 1) if i < 40 or i > len(data) - 40]
    for first in points:
        for second in points:
            if second < first:
                continue
            decoder = make()
            frames = decoder.feed(data[:first])
            frames += decoder.feed(data[first:second])
            frames += decoder.feed(data[second:])
            assert frames + decoder.close() == expected, (first, second)


@pytest.mark.parametrize(("name", "make", "data", "expected"), CASES, ids=CASE_IDS)
def test_one_byte_at_a_time(
    name: str, make: Callable[[], Decoder[Any]], data: bytes, expected: list[Any]
) -> None:
    decoder = make()
    frames: list[Any] = []
    for i in range(len(data)):
        frames += decoder.feed(data[i : i + 1])
        assert decoder.buffered <= max(len(data), 1)
    assert decoder.buffered == 0
    assert frames + decoder.close() == expected


@pytest.mark.parametrize(("name", "make", "data", "expected"), CASES, ids=CASE_IDS)
def test_accepts_bytearray_and_memoryview(
    name: str, make: Callable[[], Decoder[Any]], data: bytes, expected: list[Any]
) -> None:
    decoder = make()
    half = len(data) // 2
    frames = decoder.feed(bytearray(data[:half]))
    frames += decoder.feed(memoryview(data)[half:])
    assert frames == expected
    for frame in frames:
        assert type(frame[1] if isinstance(frame, tuple) else frame) is bytes


# -- the talk's bug: a frame longer than one read ----------------------------------------


@pytest.mark.parametrize("framing", ["newline", "length"])
def test_79435_byte_frame_across_1024_byte_reads(framing: str) -> None:
    big = (b'{"seq":7,"data":"' + b"q" * 79435)[:79433] + b'"}'
    assert len(big) == 79435
    small = b'{"seq":8}'
    encode = encode_newline if framing == "newline" else encode_length_prefixed
    data = encode([small, big, small, big])
    decoder = FRAMINGS[framing]()
    frames: list[bytes] = []
    for pos in range(0, len(data), 1024):
        frames += decoder.feed(data[pos : pos + 1024])
    assert decoder.buffered == 0
    assert frames == [small, big, small, big]
    assert decoder.close() == []


def test_grpc_large_message_across_reads() -> None:
    big = bytes(range(256)) * 400
    data = encode_grpc_message(big) + encode_grpc_message(b"tail", compressed=True)
    decoder = GrpcMessageDecoder()
    assert feed_chunks(decoder, data, [1024]) == [(False, big), (True, b"tail")]


# -- newline specifics -------------------------------------------------------------------


def test_newline_skips_empty_lines_and_keeps_carriage_returns() -> None:
    decoder = NewlineDecoder()
    assert decoder.feed(b"\n\na\n\n\nb\r\n\n") == [b"a", b"b\r"]
    assert decoder.feed(b"\n") == []
    assert decoder.buffered == 0


def test_newline_remainder_is_buffered_and_returned_at_close() -> None:
    decoder = NewlineDecoder()
    assert decoder.feed(b"one\ntw") == [b"one"]
    assert decoder.buffered == 2
    assert decoder.feed(b"o") == []
    assert decoder.buffered == 3
    assert decoder.close() == [b"two"]
    assert decoder.buffered == 0
    assert decoder.close() == []


def test_newline_close_with_nothing_pending() -> None:
    decoder = NewlineDecoder()
    assert decoder.feed(b"a\n") == [b"a"]
    assert decoder.close() == []


def test_newline_frames_are_bytes_not_views() -> None:
    frames = NewlineDecoder().feed(b"a\nb\n")
    assert all(type(frame) is bytes for frame in frames)


def test_encode_newline_refuses_newline_and_empty_payloads() -> None:
    with pytest.raises(ValueError, match="contains"):
        encode_newline([b"ok", b"bad\nline"])
    with pytest.raises(ValueError, match="empty"):
        encode_newline([b"ok", b""])
    assert encode_newline([]) == b""
    assert encode_newline(iter([b"a", b"b"])) == b"a\nb\n"


# -- size limits -------------------------------------------------------------------------


def test_newline_complete_frame_at_the_limit_passes_one_over_raises() -> None:
    decoder = NewlineDecoder(max_frame_size=10)
    assert decoder.feed(b"x" * 10 + b"\n") == [b"x" * 10]
    with pytest.raises(FrameTooLarge) as info:
        NewlineDecoder(max_frame_size=10).feed(b"ok\n" + b"x" * 11 + b"\nok\n")
    assert (info.value.size, info.value.limit) == (11, 10)


def test_newline_incomplete_frame_raises_as_soon_as_it_is_over() -> None:
    decoder = NewlineDecoder(max_frame_size=10)
    assert decoder.feed(b"a\n" + b"x" * 6) == [b"a"]
    assert decoder.feed(b"x" * 4) == []  # 10 bytes held: at the limit, still fine
    assert decoder.buffered == 10
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"x")  # no newline yet, but it can only get longer
    assert info.value.size == 11


def test_newline_remainder_over_limit_in_one_read() -> None:
    with pytest.raises(FrameTooLarge):
        NewlineDecoder(max_frame_size=10).feed(b"short\n" + b"y" * 11)


def test_newline_frame_completed_over_the_limit_across_reads() -> None:
    decoder = NewlineDecoder(max_frame_size=10)
    decoder.feed(b"x" * 8)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"xxx\n")
    assert info.value.size == 11


@pytest.mark.parametrize(
    ("make", "header"),
    [
        (LengthPrefixDecoder, struct.pack(">I", 11)),
        (GrpcMessageDecoder, struct.pack(">BI", 0, 11)),
    ],
)
def test_prefix_header_over_limit_raises_before_the_body(
    make: Callable[[int], Decoder[Any]], header: bytes
) -> None:
    # The header alone is enough: the decoder must not wait for (or buffer) the body.
    decoder = make(10)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header)
    assert (info.value.size, info.value.limit) == (11, 10)
    # Same when the header arrives one byte at a time behind a valid frame.
    decoder = make(10)
    ok = header[:-1] + bytes([10]) + b"z" * 10
    assert decoder.feed(ok + header[:2]) != []
    decoder.feed(header[2:-1])
    with pytest.raises(FrameTooLarge):
        decoder.feed(header[-1:])


def test_length_frame_at_the_limit_passes() -> None:
    decoder = LengthPrefixDecoder(max_frame_size=10)
    assert decoder.feed(encode_length_prefixed([b"x" * 10])) == [b"x" * 10]


def test_announced_4_gib_frame_is_refused_not_buffered() -> None:
    decoder = LengthPrefixDecoder()
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 100)
    assert info.value.size == (1 << 32) - 1


def test_frame_too_large_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        NewlineDecoder(max_frame_size=1).feed(b"xx\n")


@pytest.mark.parametrize("make", [NewlineDecoder, LengthPrefixDecoder, GrpcMessageDecoder])
@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_limit_must_be_a_positive_integer(make: Callable[[Any], object], bad: object) -> None:
    with pytest.raises(ConfigurationError):
        make(bad)


# -- end of stream -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "data", "message"),
    [
        (LengthPrefixDecoder, struct.pack(">I", 10) + b"abc", "truncated frame: 7 of 14 bytes"),
        (LengthPrefixDecoder, b"\x00\x00", "truncated frame: 2 of at least 4 bytes"),
        (LengthPrefixDecoder, struct.pack(">I", 3), "truncated frame: 4 of 7 bytes"),
        (GrpcMessageDecoder, struct.pack(">BI", 1, 6) + b"abc", "truncated frame: 8 of 11 bytes"),
        (GrpcMessageDecoder, b"\x00\x00\x00\x00", "truncated frame: 4 of at least 5 bytes"),
    ],
)
def test_truncated_close(make: Callable[[], Decoder[Any]], data: bytes, message: str) -> None:
    decoder = make()
    assert decoder.feed(data) == []
    assert decoder.buffered == len(data)
    with pytest.raises(ProtocolError, match=message):
        decoder.close()
    assert decoder.buffered == 0
    assert decoder.close() == []


def test_zero_length_frames_are_legal() -> None:
    decoder = LengthPrefixDecoder()
    assert decoder.feed(b"\x00" * 12) == [b"", b"", b""]
    assert decoder.close() == []


def test_grpc_rejects_an_invalid_compressed_flag() -> None:
    with pytest.raises(ProtocolError, match="compressed flag"):
        GrpcMessageDecoder().feed(b"\x02\x00\x00\x00\x01x")
    decoder = GrpcMessageDecoder()
    decoder.feed(b"\x07\x00")
    with pytest.raises(ProtocolError, match="compressed flag"):
        decoder.feed(b"\x00\x00\x01")


def test_grpc_encoding_matches_the_wire_format() -> None:
    assert encode_grpc_message(b"hi") == b"\x00\x00\x00\x00\x02hi"
    assert encode_grpc_message(b"", compressed=True) == b"\x01\x00\x00\x00\x00"
    assert encode_length_prefixed([b"hi", b""]) == b"\x00\x00\x00\x02hi\x00\x00\x00\x00"


def test_payloads_are_sliced_from_the_read_when_aligned() -> None:
    # A read made of whole frames yields payloads without buffering anything.
    decoder = LengthPrefixDecoder()
    data = encode_length_prefixed([b"a" * 1000, b"b" * 1000])
    assert decoder.feed(data) == [b"a" * 1000, b"b" * 1000]
    assert decoder.buffered == 0


# -- fuzzing: encode, chunk at random, decode ---------------------------------------------

chunkings = st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=500).filter(lambda p: b"\n" not in p and p != b"")),
    sizes=chunkings,
)
def test_fuzz_newline_roundtrip(payloads: list[bytes], sizes: list[int]) -> None:
    decoder = NewlineDecoder(max_frame_size=500)
    assert feed_chunks(decoder, encode_newline(payloads), sizes) == payloads


def test_newline_long_frames_switch_modes_and_copy_out_of_a_reused_buffer() -> None:
    decoder = NewlineDecoder()
    assert not decoder.long_frames
    assert decoder.feed(b"x" * 600 + b"\n" + b"y" * 10) == [b"x" * 600]
    assert decoder.long_frames  # now found one newline at a time
    buffer = bytearray(b"y" * 5 + b"\n" + b"z" * 700 + b"\n" + b"tail")
    assert decoder.feed_buffer(buffer, len(buffer)) == [b"y" * 15, b"z" * 700]
    assert decoder.payload_bytes == 715
    buffer[:] = b"\0" * len(buffer)  # the caller reuses it: the held "tail" is a copy
    assert decoder.feed(b"\na\nb\n") == [b"tail", b"a", b"b"]
    assert not decoder.long_frames  # short frames: back to one split per chunk


@settings(max_examples=150, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=3000).filter(lambda p: b"\n" not in p)),
    sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20),
    reuse=st.booleans(),
)
def test_fuzz_newline_long_frames(payloads: list[bytes], sizes: list[int], reuse: bool) -> None:
    # Frames from 512 bytes on take the find-and-slice path (and, with a reused buffer,
    # feed_buffer copies out of it); the frames and payload_bytes must be the same.
    data = b"".join(p + b"\n" for p in payloads)
    decoder = NewlineDecoder(max_frame_size=3000)
    buffer = bytearray(5000)
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(data):
        chunk = data[pos : pos + sizes[i % len(sizes)]]
        if reuse:
            buffer[: len(chunk)] = chunk
            frames = decoder.feed_buffer(buffer, len(chunk))
            buffer[:] = b"\xff" * len(buffer)
        else:
            frames = decoder.feed(chunk)
        assert all(type(frame) is bytes for frame in frames)
        assert decoder.payload_bytes == sum(map(len, frames))
        out += frames
        pos += len(chunk)
        i += 1
    out += decoder.close()
    assert out == [p for p in payloads if p]  # empty lines are skipped


@settings(max_examples=150, deadline=None)
@given(payloads=st.lists(st.binary(max_size=500)), sizes=chunkings)
def test_fuzz_length_roundtrip(payloads: list[bytes], sizes: list[int]) -> None:
    decoder = LengthPrefixDecoder(max_frame_size=500)
    assert feed_chunks(decoder, encode_length_prefixed(payloads), sizes) == payloads


@settings(max_examples=150, deadline=None)
@given(messages=st.lists(st.tuples(st.booleans(), st.binary(max_size=500))), sizes=chunkings)
def test_fuzz_grpc_roundtrip(messages: list[tuple[bool, bytes]], sizes: list[int]) -> None:
    decoder = GrpcMessageDecoder(max_message_size=500)
    assert feed_chunks(decoder, grpc_stream(messages), sizes) == messages


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300), sizes=chunkings)
def test_fuzz_garbage_never_escapes_the_error_tree(data: bytes, sizes: list[int]) -> None:
    # Arbitrary bytes: frames come out or a ProtocolError is raised, nothing else, and the
    # decoder never holds more than its limit plus one header.
    for make in (
        lambda: NewlineDecoder(64),
        lambda: LengthPrefixDecoder(64),
        lambda: GrpcMessageDecoder(64),
    ):
        decoder: Decoder[Any] = make()
        with contextlib.suppress(ProtocolError):
            feed_chunks(decoder, data, sizes)
        assert decoder.buffered <= 64 + 5


# -- the module's shape ------------------------------------------------------------------


def test_public_names() -> None:
    assert isinstance(codecs.__all__, tuple)
    # ("@py_builtins" and the like: pytest rewrites asserts in the whole distribution that
    # registers a pytest plugin, this one included.)
    public = {name for name in dir(codecs) if not name.startswith(("_", "@"))}
    assert set(codecs.__all__) == public
    assert set(FRAMINGS) == {"newline", "length"}
    for make in FRAMINGS.values():
        assert make(max_frame_size=5).feed(b"") == []


def test_codecs_import_no_trio_and_nothing_else_of_the_package() -> None:
    package = Path(codecs.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert not name.startswith("trio"), (path.name, name)
                if name.startswith(".."):
                    assert name == ".._errors", (path.name, name)


def test_frames_before_an_oversize_one_are_handed_over_with_the_error() -> None:
    from trio_gateway.codecs import GrpcMessageDecoder, LengthPrefixDecoder, NewlineDecoder

    newline = NewlineDecoder(max_frame_size=10)
    with pytest.raises(FrameTooLarge) as caught:
        newline.feed(b"one\ntwo\n" + b"x" * 11 + b"\nnever\n")
    assert caught.value.frames == [b"one", b"two"]
    length = LengthPrefixDecoder(max_frame_size=10)
    with pytest.raises(FrameTooLarge) as caught:
        length.feed(encode_length_prefixed([b"a", b"bb"]) + (11).to_bytes(4, "big"))
    assert caught.value.frames == [b"a", b"bb"]
    grpc = GrpcMessageDecoder(max_message_size=10)
    with pytest.raises(FrameTooLarge) as caught:
        grpc.feed(encode_grpc_message(b"ok") + b"\x00" + (11).to_bytes(4, "big"))
    assert caught.value.frames == [(False, b"ok")]


@pytest.mark.parametrize("framing", ["newline", "length"])
def test_payload_bytes_counts_what_each_feed_returned(framing: str) -> None:
    from trio_gateway.codecs import FRAMINGS

    payloads = [b"alpha", b"", b"be", b"gamma-delta" * 50, b"z"]
    if framing == "newline":
        data = b"alpha\n\nbe\n" + b"gamma-delta" * 50 + b"\nz"
    else:
        data = encode_length_prefixed(payloads)
    for step in (1, 3, 7, 64, len(data)):
        decoder = FRAMINGS[framing](max_frame_size=1000)
        total = 0
        frames: list[bytes] = []
        for start in range(0, len(data), step):
            got = decoder.feed(data[start : start + step])
            assert decoder.payload_bytes == sum(map(len, got))
            frames += got
            total += decoder.payload_bytes
        if framing == "newline":
            got = decoder.close()
            assert decoder.payload_bytes == sum(map(len, got))
            frames += got
            total += decoder.payload_bytes
        assert total == sum(map(len, frames)) == sum(map(len, payloads))


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=40).filter(lambda p: b"\n" not in p)),
    sizes=chunkings,
    limit=st.sampled_from([8, 60, 1 << 20]),
)
def test_fuzz_newline_packed_matches_feed(lines: list[bytes], sizes: list[int], limit: int) -> None:
    # feed_packed keeps a read's frames in one bytes (what the TCP source queues packed): the
    # same frames (empty lines skipped), payload_bytes, held bytes and FrameTooLarge as feed.
    data = b"".join(line + b"\n" for line in lines)
    plain, packed = NewlineDecoder(limit), NewlineDecoder(limit)
    pos, i = 0, 0
    while pos < len(data):
        chunk = data[pos : pos + sizes[i % len(sizes)]]
        pos += len(chunk)
        i += 1
        try:
            expected = plain.feed(chunk)
        except FrameTooLarge:
            with pytest.raises(FrameTooLarge):
                packed.feed_packed(chunk)
            return
        block, end, count = packed.feed_packed(chunk)
        assert count == len(expected) and packed.payload_bytes == plain.payload_bytes
        assert block[:end] == b"".join(frame + b"\n" for frame in expected)
        assert packed.buffered == plain.buffered
    assert packed.close() == plain.close()
