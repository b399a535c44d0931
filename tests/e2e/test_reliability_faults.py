"""Faults against ``serve`` as a subprocess, with real clients: what survives and what is counted.

* SIGTERM while four clients stream over TCP, WebSocket, gRPC (bidi, per-message acks) and HTTP:
  the ledger balances, every message acknowledged to its client (HTTP 202, gRPC Ack) is in the
  file sink, nothing is delivered twice or invented, and the streams without acknowledgements
  (TCP, WebSocket) are delivered as an unbroken prefix of what their client sent.
* The destination of a TCP sink goes away and comes back: the pump retries with exponential
  backoff and full jitter (read back from the log and from ``/metrics``), the queue fills and
  ``drop-oldest`` applies, delivery resumes, and every message is accounted for.
* A processor that raises on some messages: counted as failed by exception type, the rest
  delivered (the in-process version is in tests/unit/test_gateway.py).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest
import trio
from helpers import ServeProcess, read_payloads
from trio_websocket import ConnectionClosed, open_websocket_url

from trio_gateway._proto import gateway_pb2
from trio_gateway.codecs import LengthPrefixDecoder
from trio_gateway.sinks import decode_jsonl_record


def ledger_of(stderr: str) -> dict[str, object]:
    lines = [ln for ln in stderr.splitlines() if ln.startswith('{"ledger"')]
    assert len(lines) == 1, stderr
    ledger: dict[str, object] = json.loads(lines[0])["ledger"]
    return ledger


def dropped_total(ledger: dict[str, object]) -> int:
    dropped = ledger["dropped"]
    assert isinstance(dropped, dict)
    return sum(dropped.values())


def admin_url(gateway: ServeProcess) -> str:
    for line in gateway.stderr_lines:
        match = re.search(r"admin endpoint on (http://\S+/metrics)", line)
        if match:
            return match[1]
    raise AssertionError("no admin endpoint in the log")


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text page."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


def sequence_of(payload: bytes) -> int:
    return int(payload.rsplit(b"-", 1)[1])


# -- SIGTERM while four clients stream ------------------------------------------------------------


class Streams:
    """What each client sent and which of those the gateway acknowledged."""

    def __init__(self) -> None:
        self.sent: dict[str, list[bytes]] = {t: [] for t in ("tcp", "websocket", "grpc", "http")}
        self.acked: dict[str, set[bytes]] = {"grpc": set(), "http": set()}
        self.ended: dict[str, str] = {}
        self.stop = threading.Event()


async def tcp_client(port: int, streams: Streams) -> None:
    sent = streams.sent["tcp"]
    try:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            while not streams.stop.is_set():
                batch = [b"tcp-%07d" % (len(sent) + i) for i in range(50)]
                await stream.send_all(b"\n".join(batch) + b"\n")
                sent.extend(batch)  # in the kernel's hands: the gateway may or may not read it
                await trio.sleep(0.002)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        streams.ended["tcp"] = repr(exc)


async def ws_client(port: int, streams: Streams) -> None:
    sent = streams.sent["websocket"]
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            while not streams.stop.is_set():
                payload = b"websocket-%07d" % len(sent)
                await ws.send_message(payload)
                sent.append(payload)
                if len(sent) % 20 == 0:
                    await trio.sleep(0.002)
    except (ConnectionClosed, OSError, trio.BrokenResourceError) as exc:
        streams.ended["websocket"] = repr(exc)


async def http_client(port: int, streams: Streams) -> None:
    sent, acked = streams.sent["http"], streams.acked["http"]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while not streams.stop.is_set():
                payload = b"http-%07d" % len(sent)
                sent.append(payload)
                reply = await client.post("/ingest", content=payload)
                if reply.status_code == 202:
                    acked.add(payload)
    except httpx.HTTPError as exc:
        streams.ended["http"] = repr(exc)


def grpc_bidi_client(port: int, streams: Streams) -> None:
    """StreamAcked: one Ack per message; ``accepted`` means it is in the gateway's queue."""
    sent, acked = streams.sent["grpc"], streams.acked["grpc"]

    def messages():  # type: ignore[no-untyped-def]
        while not streams.stop.is_set():
            payload = b"grpc-%07d" % len(sent)
            sent.append(payload)
            yield gateway_pb2.Message(payload=payload, sequence=len(sent) - 1)
            if len(sent) % 20 == 0:
                time.sleep(0.002)

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            "/trio_gateway.v1.Gateway/StreamAcked",
            request_serializer=gateway_pb2.Message.SerializeToString,
            response_deserializer=gateway_pb2.Ack.FromString,
        )
        try:
            for ack in call(messages(), timeout=30):
                if ack.accepted:
                    acked.add(b"grpc-%07d" % ack.sequence)
        except grpc.RpcError as exc:
            streams.ended["grpc"] = exc.code().name


def delivered_by_transport(out: Path) -> dict[str, list[bytes]]:
    delivered: dict[str, list[bytes]] = {}
    if not out.exists():
        return delivered
    with out.open("rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                break  # a batch still being written
            payload, record = decode_jsonl_record(line)
            delivered.setdefault(str(record["transport"]), []).append(payload)
    return delivered


@pytest.mark.slow
async def test_sigterm_while_four_clients_stream_loses_nothing_acknowledged(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            *("--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0"),
            *("--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"),
            *("--sink", f"file:{out}", "--grace-period", "0.5", "--admin", "off"),
        ]
    )
    streams = Streams()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tcp_client, gateway.port("tcp"), streams)
            nursery.start_soon(ws_client, gateway.port("websocket"), streams)
            nursery.start_soon(http_client, gateway.port("http"), streams)
            nursery.start_soon(
                trio.to_thread.run_sync, grpc_bidi_client, gateway.port("grpc"), streams
            )
            # SIGTERM once every stream is flowing into the sink.
            while min(map(len, delivered_by_transport(out).values()), default=0) < 200 or (
                len(delivered_by_transport(out)) < 4
            ):
                await trio.sleep(0.05)
            code, stderr = await trio.to_thread.run_sync(gateway.stop, signal.SIGTERM)
            streams.stop.set()
    assert code == 0, stderr
    ledger = ledger_of(stderr)
    assert ledger["balanced"] is True, ledger
    assert ledger["abandoned"] == 0 and dropped_total(ledger) == 0, ledger
    delivered = delivered_by_transport(out)
    assert sum(map(len, delivered.values())) == ledger["delivered"] == ledger["received"]
    assert set(streams.ended) == {"tcp", "websocket", "grpc", "http"}, "a client never noticed"
    for transport, payloads in delivered.items():
        assert len(set(payloads)) == len(payloads), f"{transport}: delivered twice"
        assert set(payloads) <= set(streams.sent[transport]), f"{transport}: never sent"
    # Acknowledged means in the sink.
    for transport, acked in streams.acked.items():
        assert acked, f"{transport}: nothing was acknowledged"
        missing = acked - set(delivered[transport])
        assert not missing, f"{transport}: acknowledged but lost: {sorted(missing)[:5]}"
    # No acknowledgements on TCP and WebSocket: what arrives is an unbroken prefix of the stream.
    for transport in ("tcp", "websocket"):
        payloads = delivered[transport]
        assert payloads == streams.sent[transport][: len(payloads)], f"{transport}: a gap"


# -- the sink's destination goes away and comes back ----------------------------------------------


class Destination:
    """A length-prefixed TCP reader on a fixed port that can shut down cleanly and come back."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.port = 0
        self.sessions = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then close the listener, half-close each connection and read
        what the sink still sends until it hangs up (a clean restart loses nothing)."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self.sessions += 1
        streams: list[trio.SocketStream] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept, listeners[0], streams, nursery)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await listeners[0].aclose()
                async with trio.open_nursery() as closing:
                    for stream in streams:
                        closing.start_soon(self._finish, stream)

    async def _accept(
        self, listener: trio.SocketListener, streams: list[trio.SocketStream], nursery: trio.Nursery
    ) -> None:
        while True:
            stream = await listener.accept()
            streams.append(stream)
            nursery.start_soon(self._read, stream, LengthPrefixDecoder())

    async def _read(self, stream: trio.SocketStream, decoder: LengthPrefixDecoder) -> None:
        try:
            while data := await stream.receive_some(65536):
                self.payloads.extend(decoder.feed(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _finish(self, stream: trio.SocketStream) -> None:
        await stream.send_eof()
        await self._read(stream, LengthPrefixDecoder())  # a frame is never split: batches whole
        await stream.aclose()


RETRY_LINE = re.compile(r"sink tcp:\S+: send failed .*; retry (\d+) in ([0-9.]+) s")


@pytest.mark.slow
async def test_sink_outage_backs_off_applies_the_policy_and_accounts_for_everything(
    serve: type[ServeProcess],
) -> None:
    destination = Destination()
    rate, seconds = 2000, 3.0
    total = int(rate * seconds)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            up = trio.CancelScope()

            async def run_destination(
                *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
            ) -> None:
                with up:
                    await destination.serve(task_status=task_status)

            await nursery.start(run_destination)
            gateway = await trio.to_thread.run_sync(
                lambda: serve(
                    [
                        *("--tcp", "127.0.0.1:0", "--sink", f"tcp:127.0.0.1:{destination.port}"),
                        *("--capacity", "500", "--policy", "drop-oldest", "--batch-size", "100"),
                        *("--admin", "127.0.0.1:0"),
                    ]
                )
            )
            metrics_url = admin_url(gateway)

            async def client() -> None:
                """``total`` messages at a fixed rate, in 10 ms slices."""
                async with await trio.open_tcp_stream("127.0.0.1", gateway.port("tcp")) as stream:
                    per_slice = rate // 100
                    for start in range(0, total, per_slice):
                        frames = [b"m-%06d" % i for i in range(start, start + per_slice)]
                        await stream.send_all(b"\n".join(frames) + b"\n")
                        await trio.sleep(0.01)

            async with httpx.AsyncClient() as http:
                async with trio.open_nursery() as sending:
                    sending.start_soon(client)
                    while len(destination.payloads) < 1000:
                        await trio.sleep(0.01)
                    up.cancel()  # the destination shuts down cleanly and stays away for 1.5 s
                    await trio.sleep(1.5)
                    during = (await http.get(metrics_url)).text
                    up = trio.CancelScope()
                    await nursery.start(run_destination)  # back on the same port
                # Everything is sent: wait until the queue has emptied into the destination.
                while True:
                    after = (await http.get(metrics_url)).text
                    if not metric(after, "trio_gateway_queue_depth") and not metric(
                        after, "trio_gateway_pump_in_flight_messages"
                    ):
                        break
                    await trio.sleep(0.05)
            code, stderr = await trio.to_thread.run_sync(gateway.stop)
            up.cancel()
    assert code == 0, stderr
    ledger = ledger_of(stderr)
    dropped = ledger["dropped"]
    assert isinstance(dropped, dict)
    # Every message accounted for: read, then delivered or dropped by the policy.
    assert ledger["received"] == total and ledger["rejected"] == {}
    assert ledger["abandoned"] == 0 and ledger["balanced"] is True
    assert dropped["drop_oldest"] > 0, "the queue never filled"
    assert ledger["delivered"] + dropped["drop_oldest"] == total
    # At-least-once: nothing delivered is missing at the destination; a batch cut off by the
    # outage may arrive twice, never a message that was not sent.
    distinct = Counter(destination.payloads)
    assert len(distinct) == ledger["delivered"]
    assert set(distinct) <= {b"m-%06d" % i for i in range(total)}
    assert destination.sessions == 2
    # Retried with exponential backoff and full jitter: attempt n waits in [c/2, c],
    # c = min(5, 0.1 * 2 ** (n - 1)); the log says so and /metrics counted every retry.
    retries = [(int(n), float(s)) for n, s in RETRY_LINE.findall(stderr)]
    assert len(retries) >= 3, stderr
    for attempt, delay in retries:
        ceiling = min(5.0, 0.1 * 2 ** (attempt - 1))
        assert ceiling / 2 - 0.01 <= delay <= ceiling + 0.01, (attempt, delay)
    assert [n for n, _ in retries] == list(range(1, len(retries) + 1))
    assert metric(during, "trio_gateway_sink_retries_total") >= len(retries)
    assert metric(during, "trio_gateway_sink_failed_total") >= len(retries)


# -- a processor that raises on some messages -----------------------------------------------------


def test_processor_errors_are_counted_by_type_and_the_rest_delivered(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    (tmp_path / "flaky_processor.py").write_text(
        "def process(message):\n"
        "    n = int(message.payload.split(b'-')[1])\n"
        "    if n % 10 == 3:\n"
        "        raise ValueError('no threes')\n"
        "    if n % 10 == 7:\n"
        "        return {'not': 'bytes'}\n"
        "    return message.payload\n"
    )
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            *("--tcp", "127.0.0.1:0", "--sink", f"file:{out}", "--admin", "127.0.0.1:0"),
            *("--processor", "flaky_processor:process"),
        ],
        env={"PYTHONPATH": str(tmp_path)},
    )
    import socket

    with socket.create_connection(("127.0.0.1", gateway.port("tcp"))) as sock:
        sock.sendall(b"".join(b"p-%04d\n" % i for i in range(1000)))
    deadline = time.monotonic() + 10
    while len(read_payloads(out)) < 800 and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics = httpx.get(admin_url(gateway)).text
    code, stderr = gateway.stop()
    assert code == 0, stderr
    assert read_payloads(out) == [b"p-%04d" % i for i in range(1000) if i % 10 not in (3, 7)]
    ledger = ledger_of(stderr)
    dropped = ledger["dropped"]
    assert isinstance(dropped, dict)
    assert dropped["processor_error"] == 200 and ledger["delivered"] == 800
    assert ledger["balanced"] is True
    failed = 'trio_gateway_processor_failed_messages_total{error="%s"}'
    assert metric(metrics, failed % "ValueError") == 100
    assert metric(metrics, failed % "TypeError") == 100  # returned neither bytes nor None
    # logged, but rate-limited: 200 failures do not make 200 lines
    failures = [ln for ln in stderr.splitlines() if "processor" in ln and "failed" in ln]
    assert 1 <= len(failures) <= 20
