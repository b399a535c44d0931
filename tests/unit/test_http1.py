"""The sans-IO HTTP/1.1 request parser, fed bytes: framing, bounds and what it refuses."""

from __future__ import annotations

import pytest

from trio_gateway._http1 import BadRequest, BodyTooLarge, RequestParser

POST = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"POST /ingest HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def parser(data: bytes = b"", max_header_size: int = 1024) -> RequestParser:
    p = RequestParser(max_header_size=max_header_size)
    if data:
        p.receive_data(data)
    return p


def test_pipelined_requests_come_out_one_at_a_time() -> None:
    p = parser(POST + POST.replace(b"hello", b"world") + b"GET / HTTP/1.1\r\nHost: y\r\n\r\n")
    for body in (b"hello", b"world"):
        request = p.head()
        assert request is not None
        assert (request.method, request.target) == (b"POST", b"/ingest")
        assert (b"content-length", b"5") in request.headers  # names lowercased
        assert p.body(100)
        assert p.take_body() == body
        p.next_cycle()
    request = p.head()
    assert request is not None and request.method == b"GET" and p.complete
    assert p.buffered == 0


def test_a_head_and_body_in_pieces() -> None:
    p = parser()
    heads = 0
    for byte in POST[:-1]:
        p.receive_data(bytes([byte]))
        if p.head() is not None:
            heads += 1
            assert not p.body(100)
    assert heads == len(b"\nhell")  # from the last byte of the head on
    p.receive_data(b"o")
    assert p.body(100) and p.take_body() == b"hello"


def test_chunked_body_with_trailers_stops_at_its_end() -> None:
    p = parser(CHUNKED + b"2;ext=1\r\nab\r\n3\r\n\r\n\r\r\n0\r\nX-Trailer: y\r\n\r\nNEXT")
    request = p.head()
    assert request is not None
    assert p.body(100)
    assert p.take_body() == b"ab\r\n\r"
    assert [name for name, _ in request.headers] == [b"host", b"transfer-encoding"]
    assert p.buffered == len(b"NEXT")  # the next request's bytes were not parsed


def test_a_chunked_body_growing_past_the_limit() -> None:
    p = parser(CHUNKED + b"3e9\r\n" + b"c" * 1001)
    p.head()
    with pytest.raises(BodyTooLarge):
        p.body(1000)


def test_trailers_are_bounded_like_a_head() -> None:
    p = parser(CHUNKED + b"2\r\nab\r\n0\r\nX-Trailer: ")
    p.head()
    with pytest.raises(BadRequest) as info:
        for _ in range(20):
            p.receive_data(b"t" * 100)
            assert not p.body(100)
    assert info.value.status == 431


def test_a_head_over_the_limit_is_431_whole_or_trickled() -> None:
    big = b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000
    with pytest.raises(BadRequest) as whole:
        parser(big + b"\r\n\r\n").head()
    p = parser()
    with pytest.raises(BadRequest) as trickled:
        for i in range(0, len(big), 100):
            p.receive_data(big[i : i + 100])
            assert p.head() is None
    assert whole.value.status == trickled.value.status == 431


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x01\x02 garbage", 400),  # refused at once, before any end of head
        (b"POST / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\n", 400),  # no Host
        (b"POST / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"POST / HTTP/1.1\nHost: a\n\n", 400),  # bare LF
    ],
)
def test_refusals(data: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as info:
        parser(data).head()
    assert info.value.status == status


def test_end_of_stream_inside_a_request() -> None:
    p = parser(POST[:-2])
    p.head()
    p.receive_data(b"")
    with pytest.raises(BadRequest):
        p.body(100)
    p = parser(b"POST /ingest HTT")
    p.receive_data(b"")
    with pytest.raises(BadRequest):
        p.head()
    p = parser(b"\r\n")  # nothing begun: a plain end of stream
    p.receive_data(b"")
    assert p.head() is None and not p.started


def test_keep_alive_expect_and_upgrade() -> None:
    p = parser(b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert p.head() is not None and p.complete and not p.keep_alive  # 1.0: one request
    p = parser(POST.replace(b"Host: x", b"Host: x\r\nConnection: close"))
    assert p.head() is not None and not p.keep_alive
    p = parser(POST.replace(b"Host: x", b"Host: x\r\nExpect: 100-continue")[:-5])
    assert p.head() is not None and p.expects_continue
    p = parser(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\nxyz")
    assert p.head() is not None and p.complete and not p.keep_alive
