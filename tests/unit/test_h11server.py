"""The one h11 server driver (HTTP source and admin endpoint), fed over memory streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_gateway._h11server import BadRequest, BodyTooLarge, H11Server, RequestTooSlow

POST = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"


async def test_keep_alive_cycle_reads_head_and_body_and_answers() -> None:
    client, server = trio.testing.memory_stream_pair()
    http = H11Server(server, max_header_size=1024, received=POST)
    await client.send_all(POST)
    for _ in range(2):
        request = await http.receive_request(trio.current_time() + 5)
        assert request is not None and request.method == b"POST"
        assert await http.receive_body(100, trio.current_time() + 5) == b"hello"
        assert await http.respond(202, [(b"content-length", b"2")], b"ok")
        assert http.next_cycle()
    answers = await client.receive_some()
    assert answers.count(b"HTTP/1.1 202 Accepted\r\n") == 2
    assert b"content-length: 2\r\n" in answers
    await client.aclose()
    assert await http.receive_request(trio.current_time() + 5) is None


async def test_a_whole_head_over_the_limit_is_431() -> None:
    _, server = trio.testing.memory_stream_pair()
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    http = H11Server(server, max_header_size=1024, received=head)
    with pytest.raises(BadRequest) as info:
        await http.receive_request(trio.current_time() + 5)
    assert info.value.status == 431


async def test_body_over_the_limit() -> None:
    _, server = trio.testing.memory_stream_pair()
    http = H11Server(server, max_header_size=1024, received=POST)
    await http.receive_request(trio.current_time() + 5)
    with pytest.raises(BodyTooLarge):
        await http.receive_body(4, trio.current_time() + 5)
    assert await http.respond(413, [], b"")
    assert not http.next_cycle()  # the body was not read: the connection closes


async def test_trickling_bytes_do_not_extend_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = H11Server(server, max_header_size=1024)

    async def trickle() -> None:
        for byte in POST[:-1]:
            await client.send_all(bytes([byte]))
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        start = trio.current_time()
        with pytest.raises(RequestTooSlow):
            await http.receive_request(start + 3)
            await http.receive_body(100, start + 3)
        assert trio.current_time() - start == pytest.approx(3)
        nursery.cancel_scope.cancel()


async def test_quiet_between_requests_is_not_too_slow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, server = trio.testing.memory_stream_pair()
    http = H11Server(server, max_header_size=1024)
    assert await http.receive_request(trio.current_time() + 3) is None


async def test_100_continue_is_sent_before_the_body_is_read() -> None:
    client, server = trio.testing.memory_stream_pair()
    head = POST.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")[:-5]
    http = H11Server(server, max_header_size=1024, received=head)
    await http.receive_request(trio.current_time() + 5)
    async with trio.open_nursery() as nursery:
        body: list[bytes] = []

        async def read_body() -> None:
            body.append(await http.receive_body(100, trio.current_time() + 5))

        nursery.start_soon(read_body)
        assert (await client.receive_some()).startswith(b"HTTP/1.1 100 ")
        await client.send_all(b"hello")
    assert body == [b"hello"]
