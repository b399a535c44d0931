"""Sinks: JSON Lines encoding, the file sink, and the TCP sink's reconnection."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from trio_gateway import (
    Batch,
    FileSink,
    Origin,
    StdoutSink,
)
from trio_gateway._frames import Frames
from trio_gateway.sinks import decode_jsonl_record, encode_jsonl
from trio_gateway.sinks._jsonl import PIECE_BYTES, iter_jsonl
from trio_gateway.sinks._writes import _on_local_filesystem

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1700000000.25)
OTHER = Origin("udp", "udp:127.0.0.1:7001", "[::1]:6000", 1700000001.5)


def test_jsonl_records_utf8_and_binary_payloads() -> None:
    payloads = [b'{"t":21.5}', "caf\u00e9 \u2603".encode(), b"\xff\xfe\x00binary", b""]
    batch = Batch(list(payloads), [(ORIGIN, 2), (OTHER, 2)])
    lines = encode_jsonl(batch).splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    assert records[0] == {
        "transport": "tcp",
        "peer": "127.0.0.1:5000",
        "received_at": 1700000000.25,
        "payload": '{"t":21.5}',
    }
    assert records[2]["transport"] == "udp" and records[2]["peer"] == "[::1]:6000"
    assert "payload" not in records[2] and "payload_b64" in records[2]
    assert [decode_jsonl_record(line)[0] for line in lines] == payloads


@settings(max_examples=300, deadline=None)
@given(
    runs=st.lists(
        st.lists(
            st.one_of(
                st.binary(max_size=40),
                st.text(alphabet='ab"\\~`^|{}: ', max_size=40).map(str.encode),
                st.text(alphabet='ab"\\', min_size=500, max_size=700).map(str.encode),
                st.text(max_size=10).map(str.encode),
            ),
            min_size=1,
            max_size=8,
        ),
        min_size=1,
        max_size=3,
    )
)
@pytest.mark.slow
def test_jsonl_fast_paths_write_what_json_writes(runs: list[list[bytes]]) -> None:
    # Short runs are escaped together, long payloads by replace, the rest by json: every
    # path must give the bytes json's own encoder gives, record by record.
    origins = [ORIGIN, OTHER, Origin("tcp", "l", 'odd "peer" \\~', 1.0)]
    batch = Batch(
        [p for run in runs for p in run], [(origins[i], len(r)) for i, r in enumerate(runs)]
    )
    expected = []
    for payload, origin in batch:
        head = {
            "transport": origin.transport,
            "peer": origin.peer,
            "received_at": origin.received_at,
        }
        # Clean text (UTF-8 without control characters but tab, newline and return) as a
        # string, non-ASCII as it is; anything else as base64.
        clean = not any(c < 0x20 and c not in b"\t\n\r" for c in payload)
        try:
            record = {**head, "payload": payload.decode()} if clean else {}
        except UnicodeDecodeError:
            clean = False
        if not clean:
            record = {**head, "payload_b64": base64.b64encode(payload).decode()}
        expected.append(
            json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        )
    assert encode_jsonl(batch) == b"".join(expected)
    # In pieces (here of about 100 bytes), the same bytes, cut between records only.
    pieces = list(iter_jsonl(batch, piece_bytes=100))
    assert b"".join(pieces) == b"".join(expected)
    assert all(piece.endswith(b"\n") for piece in pieces)


@settings(max_examples=60, deadline=None)
@given(
    runs=st.lists(
        st.lists(
            st.lists(
                st.one_of(
                    st.text(alphabet='ab"\\~`^| ', min_size=1, max_size=30).map(str.encode),
                    st.binary(min_size=1, max_size=20).filter(lambda p: b"\n" not in p),
                ),
                min_size=1,
                max_size=6,
            ),
            min_size=1,
            max_size=3,
        ),
        min_size=1,
        max_size=3,
    ),
    piece_bytes=st.sampled_from([60, 400, PIECE_BYTES]),
)
def test_jsonl_of_packed_frames_is_the_jsonl_of_their_payloads(
    runs: list[list[list[bytes]]], piece_bytes: int
) -> None:
    # A batch still packed (TCP newline frames, never split) is encoded from the frames'
    # chunk: the same bytes as the batch of the split payloads, in pieces cut between records.
    origins = [ORIGIN, OTHER, Origin("tcp", "l", 'odd "peer" \\~', 1.0)]
    pieces: list[bytes | Frames] = []
    payloads: list[bytes] = []
    for reads in runs:
        for read in reads:
            pieces.append(Frames(b"".join(p + b"\n" for p in read), len(read)))
            payloads += read
    counts = [(origins[i], sum(map(len, reads))) for i, reads in enumerate(runs)]
    packed = Batch.of_pieces(pieces, len(payloads), counts)
    out = list(iter_jsonl(packed, piece_bytes=piece_bytes))
    assert packed.packed  # encoded without splitting the batch
    assert b"".join(out) == encode_jsonl(Batch(payloads, counts))
    assert all(piece.endswith(b"\n") for piece in out)


def test_jsonl_binary_payloads_go_out_as_base64_never_grown_sixfold() -> None:
    """A NUL byte is valid UTF-8, but JSON would write it as six bytes: a payload of control
    characters goes out as ``payload_b64`` (4/3), clean non-ASCII text as it is."""
    zeros, mixed, text = b"\0" * 100_000, b"abc\x01def", "caf\u00e9 \u2603\tok\n".encode()
    lines = encode_jsonl(Batch([zeros, mixed, text], [(ORIGIN, 3)])).splitlines()
    assert len(lines[0]) < 100_000 * 4 // 3 + 200
    assert [decode_jsonl_record(line)[0] for line in lines] == [zeros, mixed, text]
    assert b"payload_b64" in lines[1] and "caf\u00e9 \u2603".encode() in lines[2]


def test_jsonl_pieces_are_bounded_for_a_large_batch() -> None:
    payloads = [b"x" * 100] * 20_000 + [b"\0" * 3000] * 300 + [b"y" * 2000] * 300
    batch = Batch(payloads, [(ORIGIN, 10_000), (OTHER, len(payloads) - 10_000)])
    pieces = list(iter_jsonl(batch))
    assert len(pieces) > 10
    assert max(map(len, pieces)) < 2 * PIECE_BYTES
    assert b"".join(pieces) == encode_jsonl(batch)


def test_batch_iterates_and_indexes_as_messages() -> None:
    batch = Batch([b"a", b"b", b"c"], [(ORIGIN, 1), (OTHER, 2)])
    assert [(m.payload, m.origin) for m in batch] == [(b"a", ORIGIN), (b"b", OTHER), (b"c", OTHER)]
    assert batch[2].origin is OTHER and batch[-3].origin is ORIGIN
    assert Batch.of(list(batch)).runs == [(ORIGIN, 1), (OTHER, 2)]
    assert batch.nbytes == 3 and len(batch) == 3


async def test_file_sink_appends(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"existing":true}\n')
    sink = FileSink(path)
    await sink.open()
    await sink.send(Batch([b"one", b"two"], [(ORIGIN, 2)]))
    await sink.aclose()
    assert path.read_bytes().startswith(b'{"existing":true}\n')
    assert [decode_jsonl_record(line)[0] for line in path.read_bytes().splitlines()[1:]] == [
        b"one",
        b"two",
    ]


class _Ticker:
    """Counts turns of the event loop while it runs: a write in the loop stops it."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await trio.lowlevel.checkpoint()

    async def ticks_during(self, operation: Callable[[], Awaitable[None]]) -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run)
            await trio.lowlevel.checkpoint()
            before = self.ticks
            await operation()
            nursery.cancel_scope.cancel()
        return self.ticks - before


def _hold_the_file(path: Path) -> threading.Thread:
    """Append 64 MiB to ``path`` from another thread and return once that write is under way.

    Linux holds a file's inode lock through a buffered ``write()``, so a write of ours that
    starts meanwhile waits for this one to finish: a real slow write, on a local filesystem.
    """
    started = threading.Event()

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            started.set()
            os.write(fd, bytes(64 << 20))
        finally:
            os.close(fd)

    thread = threading.Thread(target=write)
    thread.start()
    started.wait()
    time.sleep(0.002)  # into its write()
    return thread


@pytest.mark.slow
async def test_file_sink_writes_small_batches_in_the_loop_and_slow_ones_in_its_thread(
    tmp_path: Path, mock_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_gateway")
    path = tmp_path / "out.jsonl"
    sink = FileSink(path)
    await sink.open()
    if not sink.inline:
        pytest.skip("tmp_path is on no filesystem the rule treats as local (see below)")
    batch = Batch([b"x" * 100] * 100, [(ORIGIN, 100)])
    ticker = _Ticker()
    try:
        # A fast write stays in the loop; the loop does not turn during it.
        assert await ticker.ticks_during(lambda: sink.send(batch)) < 5
        # A slow one still runs in the loop (nothing could tell it would be slow)...
        hog = _hold_the_file(path)
        assert await ticker.ticks_during(lambda: sink.send(batch)) < 5
        hog.join()
        # One slow write is routine on a busy machine: INFO, not a WARNING.
        (first,) = [r for r in caplog.records if "writing from a thread" in r.message]
        assert first.levelno == logging.INFO
        assert "writing from a thread for 10 s" in first.message
        # ...and sends the next writes to the thread: the loop keeps turning while they wait.
        hog = _hold_the_file(path)
        assert await ticker.ticks_during(lambda: sink.send(batch)) > 10
        hog.join()
        # After the backoff the loop tries again; slow again, the backoff doubles.
        mock_clock.jump(10.0)
        hog = _hold_the_file(path)
        assert await ticker.ticks_during(lambda: sink.send(batch)) < 5
        hog.join()
        # Slow again after the stay in the thread: that persists, and is a WARNING.
        second = [r for r in caplog.records if "writing from a thread" in r.message][-1]
        assert second.levelno == logging.WARNING
        assert "in the event loop again; writing from a thread for 20 s" in second.message
    finally:
        await sink.aclose()
        data = path.read_bytes()
        os.truncate(path, 0)
    assert data.replace(b"\0", b"") == 4 * encode_jsonl(batch)


def test_which_files_count_as_local() -> None:
    shm = Path("/dev/shm")
    if not sys.platform.startswith("linux") or not shm.is_dir():
        pytest.skip("needs Linux with a tmpfs at /dev/shm")
    with tempfile.TemporaryFile(dir=shm) as on_tmpfs:
        assert _on_local_filesystem(on_tmpfs.fileno())  # tmpfs: the page cache only
    with open("/proc/self/status", "rb") as on_procfs:
        assert not _on_local_filesystem(on_procfs.fileno())  # a regular file, but procfs
    read_end, write_end = os.pipe()
    try:
        assert not _on_local_filesystem(write_end)  # not a regular file
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_file_sink_never_writes_to_a_fifo_in_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    sink = FileSink(path)
    await sink.open()
    assert not sink.inline
    batch = Batch([b"x" * 1000] * 200, [(ORIGIN, 200)])  # 200 KiB: more than the pipe holds
    received = bytearray()

    def read_late() -> None:
        time.sleep(0.3)
        os.set_blocking(reader, True)
        while data := os.read(reader, 1 << 20):
            received.extend(data)

    thread = threading.Thread(target=read_late)
    thread.start()
    try:
        with trio.fail_after(10):
            assert await _Ticker().ticks_during(lambda: sink.send(batch)) > 10
    finally:
        await sink.aclose()
        thread.join()
        os.close(reader)
    assert received == encode_jsonl(batch)


async def test_file_sink_with_fsync_writes_in_its_thread(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out.jsonl", fsync=True)
    await sink.open()
    assert not sink.inline
    await sink.send(Batch([b"one"], [(ORIGIN, 1)]))
    await sink.aclose()
    assert decode_jsonl_record((tmp_path / "out.jsonl").read_bytes())[0] == b"one"


async def test_stdout_redirected_to_a_file_is_written_in_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "stdout.jsonl"
    batch = Batch([b"x" * 100] * 100, [(ORIGIN, 100)])
    with path.open("ab") as stream:
        sink = StdoutSink(stream)
        await sink.open()
        if not sink.inline:
            pytest.skip("tmp_path is on no filesystem the rule treats as local (see below)")
        assert await _Ticker().ticks_during(lambda: sink.send(batch)) < 5
        await sink.aclose()
    assert path.read_bytes() == encode_jsonl(batch)


async def test_stdout_to_a_pipe_is_written_from_its_thread() -> None:
    read_end, write_end = os.pipe()
    batch = Batch([b"x" * 1000] * 200, [(ORIGIN, 200)])  # 200 KiB: more than the pipe holds
    received = bytearray()

    def read_late() -> None:
        time.sleep(0.3)
        while data := os.read(read_end, 1 << 20):
            received.extend(data)

    thread = threading.Thread(target=read_late)
    thread.start()
    try:
        with os.fdopen(write_end, "wb") as stream:
            sink = StdoutSink(stream)
            await sink.open()
            assert not sink.inline
            with trio.fail_after(10):
                assert await _Ticker().ticks_during(lambda: sink.send(batch)) > 10
            await sink.aclose()
    finally:
        thread.join()
        os.close(read_end)
    assert received == encode_jsonl(batch)


async def test_stdout_to_a_stream_without_a_file_descriptor() -> None:
    stream = io.BytesIO()
    sink = StdoutSink(stream)
    await sink.send(Batch([b"one"], [(ORIGIN, 1)]))  # open() is implied
    await sink.aclose()
    assert not sink.inline
    assert decode_jsonl_record(stream.getvalue())[0] == b"one"
