"""The unary HTTP source, against real clients: curl, httpx (HTTP/1.1 and HTTP/2), raw sockets."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import helpers
import httpx
import pytest
import trio
import trustme
from helpers import refuses_connections, wait_until

from trio_gateway import Gateway
from trio_gateway._errors import ConfigurationError
from trio_gateway._h11server import H11Server
from trio_gateway.queues import RingBuffer
from trio_gateway.sources.http import HttpSource
from trio_gateway.testing import RecordingSink, serve_source

CURL = "/usr/bin/curl"
NDJSON = {"content-type": "application/x-ndjson"}


serving = partial(helpers.serving, HttpSource)


async def curl(*args: str, stdin: bytes = b"") -> tuple[int, dict[str, str], bytes, str]:
    """Run curl (``stdin``: what it reads for ``@-``); returns (status, headers, body, protocol
    version)."""
    with trio.fail_after(10):
        result = await trio.run_process(
            [CURL, "-sS", "-D", "-", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    raw = result.stdout
    # Skip any "100 Continue" interim head.
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    version, status = status_line.split()[:2]
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status), headers, body, version


# -- the happy paths, with real clients -----------------------------------------------------


async def test_curl_http11_one_message() -> None:
    async with serving() as run:
        status, headers, body, version = await curl(
            "-X", "POST", "--data-binary", "hello world", run.url
        )
        assert (version, status) == ("HTTP/1.1", 202)
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"accepted": 1}
        assert run.payloads() == [b"hello world"]
        assert run.ingress.counters.received == 1


async def test_curl_http2_prior_knowledge() -> None:
    async with serving() as run:
        status, _, body, version = await curl(
            "--http2-prior-knowledge", "-X", "POST", "--data-binary", "over h2c", run.url
        )
        assert (version, status) == ("HTTP/2", 202)
        assert json.loads(body) == {"accepted": 1}
        assert run.payloads() == [b"over h2c"]


@pytest.mark.parametrize("http2", [False, True])
async def test_httpx_keepalive_binary_payloads(http2: bool) -> None:
    payloads = [bytes([i]) * (i + 1) + b"\x00\xff" for i in range(50)]
    async with serving() as run, httpx.AsyncClient(http1=not http2, http2=http2) as client:
        for payload in payloads:
            response = await client.post(run.url, content=payload)
            assert response.status_code == 202
            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert run.payloads() == payloads
        assert run.ingress.counters.connections_total == 1  # one keep-alive connection


async def test_http2_concurrent_large_bodies_pass_max_held_one_at_a_time() -> None:
    """Twelve 200 KB bodies at once on one HTTP/2 connection, with ``max_held`` at 64 KiB:
    past it only the oldest request's stream window is reopened, so they finish one after
    another, every one whole, whichever stream the client favours (h2's client, sending as
    its windows allow, the newest streams first: a connection window held back would stall
    it; httpx's client stalls on any server that holds a stream's window back, httpx2 issue
    1133); then curl sends one just under ``max_message_size``."""
    bodies = {1 + 2 * i: bytes([65 + i]) * 200_000 for i in range(12)}
    async with serving(max_held=64 * 1024) as run:
        client = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        client.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/ingest")]
        headers.append((":authority", "x"))
        for stream_id in bodies:
            client.send_headers(stream_id, headers)
        left = {stream_id: memoryview(body) for stream_id, body in bodies.items()}
        statuses: dict[int, str] = {}
        async with await trio.open_tcp_stream(*run.source.bound[0]) as stream:
            with trio.fail_after(10):
                while len(statuses) < len(bodies):
                    # the newest streams first: the oldest's turn must not depend on it
                    for stream_id, rest in reversed(left.items()):
                        size = min(
                            len(rest),
                            client.local_flow_control_window(stream_id),
                            client.max_outbound_frame_size,
                        )
                        if size > 0:
                            client.send_data(stream_id, rest[:size], end_stream=size == len(rest))
                            left[stream_id] = rest[size:]
                    left = {k: v for k, v in left.items() if v}
                    await stream.send_all(client.data_to_send())
                    for event in client.receive_data(await stream.receive_some(65536)):
                        if isinstance(event, h2.events.ResponseReceived):
                            statuses[event.stream_id] = dict(event.headers)[":status"]
                    await stream.send_all(client.data_to_send())
        assert set(statuses.values()) == {"202"}
        big = b"z" * ((1 << 20) - 1)
        status, _, _, version = await curl(
            "--http2-prior-knowledge", "-X", "POST", "--data-binary", "@-", run.url, stdin=big
        )
        assert (version, status) == ("HTTP/2", 202)
        assert sorted(run.payloads()) == sorted([*bodies.values(), big])
        assert run.ingress.budget.held == 0


@pytest.mark.parametrize("http2", [False, True])
async def test_ndjson_batch(http2: bool) -> None:
    lines = [b'{"n": 1}', b'"two"', b"[3]"]
    async with serving() as run, httpx.AsyncClient(http1=not http2, http2=http2) as client:
        response = await client.post(
            run.url,
            content=b"\n".join(lines) + b"\n\n",
            headers={"content-type": "application/x-ndjson; charset=utf-8"},
        )
        assert response.status_code == 202
        assert response.json() == {"accepted": 3}
        assert run.payloads() == lines


async def test_pipelined_requests_on_one_connection() -> None:
    async with serving() as run:
        port = run.source.bound[0][1]
        request = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request + b"one" + request + b"two")
                received = b""
                while received.count(b"HTTP/1.1 202") < 2:
                    received += await stream.receive_some(4096)
        assert run.payloads() == [b"one", b"two"]


async def test_a_pipelining_client_does_not_starve_the_others() -> None:
    """Requests already buffered are served without waiting on the socket; the connection
    still yields once per such request, so other tasks run in the middle of a flood."""
    count = 2000
    request = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz"
    client, server = trio.socket.socketpair()
    for sock in (client, server):  # room for every request and every answer: nothing waits
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    assert await client.send(request * count) == len(request) * count
    http = H11Server(trio.SocketStream(server), max_header_size=1024)
    served = 0
    seen: list[int] = []

    async def watch() -> None:
        while served < count:
            seen.append(served)
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10), client, server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            while served < count:
                assert await http.receive_request(trio.current_time() + 5) is not None
                assert await http.receive_body(10, trio.current_time() + 5) == b"z"
                await http.respond(202, [], b"")
                assert http.next_cycle()
                served += 1
    assert any(0 < n < count for n in seen)  # the watcher ran during the flood


# -- every refusal ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", [True, False])
async def test_unknown_path_and_wrong_method(fast_path: bool) -> None:
    async with serving(fast_path=fast_path) as run, httpx.AsyncClient() as client:
        response = await client.post(run.url.replace("/ingest", "/nope"), content=b"x")
        assert response.status_code == 404
        response = await client.get(run.url)
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        response = await client.put(run.url, content=b"x")
        assert response.status_code == 405
        assert run.payloads() == []


@pytest.mark.parametrize("fast_path", [True, False])
async def test_oversize_by_content_length_and_by_chunks(fast_path: bool) -> None:
    async with serving(max_message_size=1000, fast_path=fast_path) as run:
        async with httpx.AsyncClient() as client:
            response = await client.post(run.url, content=b"x" * 1000)
            assert response.status_code == 202
            response = await client.post(run.url, content=b"x" * 1001)
            assert response.status_code == 413
            assert response.json()["limit"] == 1000

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(20):
                    yield b"y" * 100

            response = await client.post(run.url, content=chunks())  # chunked encoding
            assert response.status_code == 413
        # curl with a huge chunked upload: refused without the server reading it all.
        status, _, _, _ = await curl(
            "-X",
            "POST",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "z" * 50_000,
            run.url,
        )
        assert status == 413
        assert run.payloads() == [b"x" * 1000]
        assert run.ingress.counters.rejected["oversize"] == 3


async def test_oversize_answered_before_the_body_is_sent() -> None:
    """Content-Length over the limit: 413 arrives although the client never sends the body."""
    async with serving(max_message_size=1000) as run:
        port = run.source.bound[0][1]
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
                )
                received = b""
                while chunk := await stream.receive_some(4096):
                    received += chunk  # the server closes after answering
        assert received.startswith(b"HTTP/1.1 413 ")
        assert b"connection: close" in received.lower()


async def test_malformed_ndjson_and_empty_body() -> None:
    async with serving() as run, httpx.AsyncClient() as client:
        response = await client.post(run.url, content=b'{"ok": 1}\n{broken\n', headers=NDJSON)
        assert response.status_code == 400
        assert response.json()["line"] == 2
        response = await client.post(run.url, content=b"")
        assert response.status_code == 400
        assert run.payloads() == []  # all or nothing: the valid first line was not queued
        assert run.ingress.counters.rejected["malformed"] == 2


async def test_malformed_http_gets_400() -> None:
    async with serving() as run:
        port = run.source.bound[0][1]
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"POST /ingest HTTP/1.1\r\nno colon here\r\n\r\n")
                received = await stream.receive_some(4096)
        assert received.startswith(b"HTTP/1.1 400 ")
        assert run.ingress.counters.rejected["malformed"] == 1


@pytest.mark.parametrize("http2", [False, True])
async def test_bearer_token(http2: bool) -> None:
    async with (
        serving(token="s3cret") as run,
        httpx.AsyncClient(http1=not http2, http2=http2) as client,
    ):
        response = await client.post(run.url, content=b"a")
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        response = await client.post(
            run.url, content=b"b", headers={"authorization": "Bearer nope"}
        )
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        response = await client.post(
            run.url, content=b"c", headers={"authorization": "Bearer s3cret"}
        )
        assert response.status_code == 202
        assert run.payloads() == [b"c"]
        assert run.ingress.counters.rejected["unauthorized"] == 2


@pytest.mark.parametrize("fast_path", [True, False])
async def test_queue_full_drop_newest_gives_503(fast_path: bool) -> None:
    async with serving(capacity=2, policy="drop_newest", fast_path=fast_path) as run:
        async with httpx.AsyncClient() as client:
            for payload in (b"1", b"2"):
                assert (await client.post(run.url, content=payload)).status_code == 202
            response = await client.post(run.url, content=b"3")
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["accepted"] == 0
        assert run.payloads() == [b"1", b"2"]
        assert run.ingress.counters.rejected["queue_full"] == 1


async def test_queue_full_block_waits_then_503_and_partial_batch() -> None:
    async with serving(capacity=3, policy="block", queue_wait=0.05, retry_after=7) as run:
        async with httpx.AsyncClient() as client:
            response = await client.post(run.url, content=b"1\n2\n3\n4\n5\n", headers=NDJSON)
            # The batch is queued in order: the first three lines are in, the client resends 4-5.
            assert response.status_code == 503
            assert response.json() == {"accepted": 3, "rejected": 2, "error": "queue full"}
            assert response.headers["retry-after"] == "7"
            assert run.payloads() == [b"1", b"2", b"3"]

            # Under block, a request waits up to queue_wait for room: a consumer frees it.
            for payload in (b"a", b"b", b"c"):
                assert (await client.post(run.url, content=payload)).status_code == 202

            async def consume_soon() -> None:
                await trio.sleep(0.01)
                run.queue.get_batch_nowait(1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume_soon)
                response = await client.post(run.url, content=b"d")
            assert response.status_code == 202
        assert run.ingress.counters.rejected["queue_full"] == 2


# -- connections ------------------------------------------------------------------------------


async def test_idle_keepalive_connection_is_closed() -> None:
    async with serving(idle_timeout=0.2) as run:
        port = run.source.bound[0][1]
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nA")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 202")
            start = trio.current_time()
            assert await stream.receive_some(4096) == b""  # closed by the server
            assert trio.current_time() - start >= 0.15
            await stream.aclose()
            # Stalling in the middle of a request is answered 408 and counted.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nA")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 408")
            await stream.aclose()
        assert run.ingress.counters.rejected == {"too_slow": 1}
        assert run.payloads() == [b"A"]


async def test_a_kept_alive_connection_keeps_its_request_deadline_between_writes() -> None:
    """After its first answer a connection waits for the next request in the listener's
    reactor (Linux): a head and a body sent apart are still served, and a request that stalls
    there (in its head or its body) is still answered 408 at its deadline."""
    first = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nA"
    async with serving(idle_timeout=0.3) as run:
        port = run.source.bound[0][1]
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(first)
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 202")
            for _ in range(3):
                await stream.send_all(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n")
                await trio.sleep(0.02)  # (a wait for its rest, not a timing: any order passes)
                await stream.send_all(b"\r\nB")
                await trio.sleep(0.02)
                await stream.send_all(b"C")
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 202")
            for stall in (
                b"POST /ingest HTTP/1.1\r\nHo",
                b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nA",
            ):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(first)
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 202")
                start = trio.current_time()
                await stream.send_all(stall)
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 408")
                assert trio.current_time() - start >= 0.2
                await stream.aclose()
        assert run.ingress.counters.rejected == {"too_slow": 2}
        assert run.payloads() == [b"A", b"BC", b"BC", b"BC", b"A", b"A"]


async def test_the_read_deadline_does_not_bound_a_wait_for_the_queue() -> None:
    """``idle_timeout`` bounds reading a request; the wait for room in the queue after it is
    ``queue_wait``'s, even when a read had waited (and set its deadline) just before."""
    request = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%s"
    async with serving(idle_timeout=0.2, capacity=1, queue_wait=0.6) as run:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(*run.address)
            await stream.send_all(request % b"A")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 202")
            await wait_until(lambda: run.counters.connections_active == 1)
            await trio.sleep(0.05)  # the server waits for the next request, by a deadline
            start = trio.current_time()
            await stream.send_all(request % b"B")  # the queue is full: it waits for room
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 503")
            assert trio.current_time() - start >= 0.55
            await stream.aclose()
        assert run.payloads() == [b"A"]
        assert run.ingress.counters.rejected == {"queue_full": 1}


async def test_shutdown_lets_in_flight_request_finish() -> None:
    async with serving(capacity=10, grace_period=2.0, timeout=5) as run:
        stream = await trio.open_tcp_stream(*run.address)
        await stream.send_all(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nAB")
        await wait_until(lambda: run.counters.connections_active == 1)
        run.stop()  # the listener closes; the request in flight may finish
        await wait_until(lambda: refuses_connections(run.address))
        await stream.send_all(b"CD")
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 202")
        await stream.aclose()
        assert run.payloads() == [b"ABCD"]


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("http2", [False, True])
async def test_tls_alpn(ca: trustme.CA, tmp_path: Path, http2: bool) -> None:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with serving(certfile=str(certfile), keyfile=str(keyfile)) as run:
        assert run.url.startswith("https://")
        async with httpx.AsyncClient(verify=client_context, http2=http2) as client:
            response = await client.post(run.url, content=b"secret")
            assert response.status_code == 202
            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert run.payloads() == [b"secret"]


async def test_tls_from_context_with_curl(ca: trustme.CA, tmp_path: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with serving(ssl_context=server_context) as run:
        status, _, _, version = await curl(
            "--cacert", str(tmp_path / "ca.pem"), "-X", "POST", "--data-binary", "tls!", run.url
        )
        assert (version, status) == ("HTTP/2", 202)
        assert run.payloads() == [b"tls!"]


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        HttpSource(certfile=str(tmp_path / "missing.pem"))
    assert info.value.key == "tls.certfile"
    with pytest.raises(ConfigurationError) as info:
        HttpSource(path="ingest")
    assert info.value.key == "http.path"
    with pytest.raises(ConfigurationError) as info:
        HttpSource(token="")
    assert info.value.key == "http.token"


# -- volume: 10,000 requests, exactly once ---------------------------------------------------

CLIENT = textwrap.dedent(
    """
    import socket, sys, threading
    port, connections, per_connection = map(int, sys.argv[1:4])

    def run(c):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        for i in range(per_connection):
            body = b"c%d-m%d-\\x00\\xff\\xfe" % (c, i)
            sock.sendall(b"POST /ingest HTTP/1.1\\r\\nHost: t\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
                         % (len(body), body))
            while b"}" not in pending:
                pending += sock.recv(65536)
            assert pending.startswith(b"HTTP/1.1 202"), pending
            pending = pending[pending.index(b"}") + 1:]
        sock.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in range(connections)]
    for t in threads: t.start()
    for t in threads: t.join()
    """
)


def expected_payloads(connections: int, per_connection: int) -> list[bytes]:
    return [
        b"c%d-m%d-\x00\xff\xfe" % (c, i) for c in range(connections) for i in range(per_connection)
    ]


async def test_ten_thousand_requests_arrive_exactly_once() -> None:
    async with serving() as run:
        port = run.source.bound[0][1]
        start = time.perf_counter()
        with trio.fail_after(60):
            await trio.run_process([sys.executable, "-c", CLIENT, str(port), "4", "2500"])
        elapsed = time.perf_counter() - start
        received = run.payloads()
        assert len(received) == 10_000
        assert sorted(received) == sorted(expected_payloads(4, 2500))
        assert run.ingress.counters.connections_total == 4
        print(f"10,000 requests over 4 keep-alive connections in {elapsed:.2f} s")


async def test_through_the_gateway_into_a_file(tmp_path: Path) -> None:
    from trio_gateway._gateway import Gateway
    from trio_gateway.sinks import FileSink, decode_jsonl_record

    out = tmp_path / "out.jsonl"
    gateway = Gateway(sources=[HttpSource()], sink=FileSink(out), queue=RingBuffer(100_000))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            port = bound[0][0][1]
            await trio.run_process([sys.executable, "-c", CLIENT, str(port), "4", "2500"])
            gateway.shutdown()
    with out.open("rb") as file:
        records = [decode_jsonl_record(line) for line in file]
    assert sorted(payload for payload, *_ in records) == sorted(expected_payloads(4, 2500))
    assert gateway.ledger.delivered == 10_000
    assert gateway.ledger.balanced


async def test_an_ndjson_batch_longer_than_a_drop_oldest_queue_is_received_and_dropped() -> None:
    """drop_oldest takes every line and drops the oldest: the batch's head when it alone is
    longer than the queue. Each line is counted once (received, then dropped), none refused,
    and the answer is 202: the sender's lines were all accepted under that policy."""
    queue = RingBuffer[bytes](3, policy="drop_oldest")
    lines = b"".join(b'{"n":%d}\n' % i for i in range(10))
    async with serve_source(HttpSource(port=0), queue) as served:
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = await client.post(
                served.url, content=lines, headers={"content-type": "application/x-ndjson"}
            )
        assert answer.status_code == 202, answer.text
        assert served.payloads() == [b'{"n":7}', b'{"n":8}', b'{"n":9}']
        assert served.counters.received == 10
        assert served.counters.rejected == {}
        assert queue.statistics().dropped["drop_oldest"] == 7


@pytest.mark.parametrize("http2", [False, True])
async def test_idempotency_key_reaches_the_sink_on_both_http_versions(http2: bool) -> None:
    # HTTP/2 answers a request the queue takes at once from its reader (ingest_nowait): the
    # key must travel that way as well as the waiting one.
    sink = RecordingSink()
    gateway = Gateway(sources=[HttpSource(port=0)], sink=sink)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            (bound,) = await nursery.start(gateway.run)
            url = f"http://127.0.0.1:{bound[0][1]}/ingest"
            async with httpx.AsyncClient(http1=not http2, http2=http2) as client:
                for n in range(3):
                    headers = {"idempotency-key": f"k-{n}"}
                    response = await client.post(url, content=b"m%d" % n, headers=headers)
                    assert response.status_code == 202, response.text
                lines = b'{"a": 1}\n{"b": 2}\n'
                headers = {**NDJSON, "idempotency-key": "nd"}
                response = await client.post(url, content=lines, headers=headers)
                assert response.status_code == 202, response.text
            await wait_until(lambda: len(sink.payloads) == 5)
            gateway.shutdown()
    assert [origin.id for origin in sink.origins] == ["k-0", "k-1", "k-2", "nd:0", "nd:1"]
