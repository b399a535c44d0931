"""The HTTP/2 frame scanner behind the HTTP source's deadlines and rapid-reset limit, fed bytes:
it knows when a preface, a frame or a header block has begun and not ended, whatever the byte
boundaries, and counts HEADERS and RST_STREAM frames; the reset window counts per window."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame

from trio_gateway.sources.http._h2scan import PREFACE, FrameScanner, ResetWindow


def client_bytes(requests: int, *, reset: bool) -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for index in range(requests):
        stream_id = 1 + 2 * index
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/ingest")]
        client.send_headers(stream_id, [*headers, (":authority", "x")])
        if reset:
            client.reset_stream(stream_id)
        else:
            client.send_data(stream_id, b"x" * 100, end_stream=True)
    client.ping(b"12345678")
    return client.data_to_send()


@pytest.mark.parametrize("step", [1, 7, 9, 4096])
def test_counts_frames_and_ends_whole_whatever_the_chunking(step: int) -> None:
    data = client_bytes(5, reset=True)
    scanner = FrameScanner()
    partial_seen = False
    for pos in range(0, len(data), step):
        scanner.feed(data[pos : pos + step])
        partial_seen |= scanner.partial
    assert (scanner.headers, scanner.resets) == (5, 5)
    assert not scanner.partial
    assert partial_seen == (step < len(data))


def test_a_preface_a_frame_or_a_header_block_begun_is_partial() -> None:
    scanner = FrameScanner()
    assert scanner.partial  # nothing yet: the preface is due
    scanner.feed(PREFACE[:10])
    assert scanner.partial
    scanner.feed(PREFACE[10:])
    assert not scanner.partial
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    scanner.feed(ping[:5])
    assert scanner.partial
    scanner.feed(ping[5:])
    assert not scanner.partial
    headers = HeadersFrame(1, data=b"\x82", flags=())  # no END_HEADERS: CONTINUATION must come
    scanner.feed(headers.serialize())
    assert scanner.partial and scanner.headers == 1
    scanner.feed(ContinuationFrame(1, data=b"\x84", flags=()).serialize())
    assert scanner.partial
    scanner.feed(ContinuationFrame(1, data=b"\x86", flags=("END_HEADERS",)).serialize())
    assert not scanner.partial


def test_data_frames_are_skipped_not_counted() -> None:
    scanner = FrameScanner()
    scanner.feed(client_bytes(3, reset=False))
    assert (scanner.headers, scanner.resets, scanner.partial) == (3, 0, False)


def test_the_reset_window_passes_its_limit_within_a_window_only() -> None:
    window = ResetWindow(10, 1.0)
    assert not window.add(10, 0.0)
    assert window.add(1, 0.5)  # 11 within one second
    assert not window.add(10, 1.6)  # a new window
    assert not window.add(0, 2.0)
