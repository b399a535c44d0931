"""Hostile gRPC peers against ``serve`` (issue 16): each attack is a small raw HTTP/2 client.

Every test checks the same four things: the server's peak RSS (``VmHWM``) grew by no more
than the connection budget (``ServerLimits.connection_budget``, 32 MiB by default) plus
64 MiB, the attack was counted under its reason on ``/metrics``, a good grpcio client on
another connection was served meanwhile, and nothing was counted ``internal_error``. One
``serve`` process (``idle_timeout`` 1 s, so the deadlines come quickly) serves the module.
"""

from __future__ import annotations

import gzip
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from helpers import ServeProcess, parse_samples, sample_value

from trio_gateway._proto import gateway_pb2

IDLE = 1.0
BUDGET = 32 << 20
MARGIN = 64 << 20
STREAM = "/trio_gateway.v1.Gateway/Stream"
BIDI = "/trio_gateway.v1.Gateway/StreamAcked"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    config = Path(tmp_path_factory.mktemp("hostile")) / "gateway.toml"
    config.write_text(
        f"""
[sink]
url = "null"

[admin]
listen = "127.0.0.1:0"

[[sources]]
transport = "grpc"
listen = "127.0.0.1:0"
idle_timeout = {IDLE}
"""
    )
    process = ServeProcess(["--config", str(config)])
    process.baseline = peak_rss(process)  # type: ignore[attr-defined]
    yield process
    process.stop()


def peak_rss(process: ServeProcess) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def rejected(process: ServeProcess, reason: str) -> float:
    url = f"http://127.0.0.1:{process.port('admin')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        samples = parse_samples(response.read().decode())
    return sample_value(samples, "trio_gateway_rejected_messages_total", reason=reason)


def good_client_served(process: ServeProcess) -> bool:
    """A grpcio unary call on a connection of its own."""
    with grpc.insecure_channel(f"127.0.0.1:{process.port('grpc')}") as channel:
        send = channel.unary_unary(
            "/trio_gateway.v1.Gateway/Send",
            request_serializer=gateway_pb2.Message.SerializeToString,
            response_deserializer=gateway_pb2.Ack.FromString,
        )
        ack = send(gateway_pb2.Message(payload=b"good", sequence=42), timeout=5)
    return bool(ack.accepted and ack.sequence == 42)


def assert_unharmed(process: ServeProcess) -> None:
    assert peak_rss(process) - process.baseline <= BUDGET + MARGIN  # type: ignore[attr-defined]
    assert rejected(process, "internal_error") == 0
    assert process.proc.poll() is None


class Raw:
    """An h2 client on a blocking socket: what an attacker scripts."""

    def __init__(
        self, process: ServeProcess, *, read_settings: bool = True, window: int | None = None
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", process.port("grpc")), timeout=5)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.initiate_connection()
        if window is not None:  # how much the server may send us per stream
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.events: list[h2.events.Event] = []
        self.goaways: list[tuple[int, int]] = []
        """(last stream id, error code) of each GOAWAY, read from the raw frames: h2 raises
        on frames that follow a GOAWAY (a PING's answer), losing its own event."""
        self._raw = b""
        self.closed = False
        self.flush()
        if read_settings:
            self.pump_until(
                lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in self.events)
            )

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.settimeout(5)
            self.sock.sendall(data)

    def headers(
        self, stream_id: int, *extra: tuple[str, str], end: bool = False, path: str = STREAM
    ) -> None:
        self.h2.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "x"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *extra,
            ],
            end_stream=end,
        )

    def pump(self, timeout: float) -> None:
        """Read for up to ``timeout`` seconds, answering what h2 answers."""
        if self.closed:
            return
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        self._scan(data)
        try:
            self.events += self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return
        self.flush()

    def pump_until(self, done: object, deadline: float = 5.0) -> None:
        end = time.monotonic() + deadline
        while not done() and time.monotonic() < end and not self.closed:  # type: ignore[operator]
            self.pump(0.1)
        assert done(), self.events[-5:]  # type: ignore[operator]

    def statuses(self) -> dict[int, str]:
        """grpc-status by stream, from every trailers or trailers-only response."""
        out = {}
        for event in self.events:
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                headers = dict(event.headers)  # type: ignore[arg-type]
                if "grpc-status" in headers:
                    out[event.stream_id] = headers["grpc-status"]
        return out

    def _scan(self, data: bytes) -> None:
        raw = self._raw + data
        while len(raw) >= 9:
            size = int.from_bytes(raw[:3], "big")
            if len(raw) < 9 + size:
                break
            if raw[3] == 7:  # GOAWAY
                self.goaways.append(struct.unpack(">LL", raw[9:17]))
            raw = raw[9 + size :]
        self._raw = raw

    def goaway(self) -> tuple[int, int] | None:
        """The last GOAWAY's (last stream id, error code), or None."""
        return self.goaways[-1] if self.goaways else None


def test_messages_that_never_finish_kept_alive_by_pings(gateway: ServeProcess) -> None:
    """64 streams each send 1 MiB of a message announced at 4 MiB, then only PINGs: the
    connection's share of the memory budget refuses the calls past 8 MiB (over_budget), and
    the rest are cut one
    idle_timeout after their message began, PINGs or not (too_slow)."""
    over, slow = rejected(gateway, "over_budget"), rejected(gateway, "too_slow")
    client = Raw(gateway)
    streams = list(range(1, 129, 2))
    prefix = b"\x00" + (4 << 20).to_bytes(4, "big")
    started = time.monotonic()  # no message begins before this
    for stream_id in streams:
        client.headers(stream_id)
        client.h2.send_data(stream_id, prefix)
    client.flush()
    chunk = bytes(256 << 10)
    for _ in range(4):  # 1 MiB each, as the windows allow
        for stream_id in streams:
            client.pump(0)
            try:
                size = min(len(chunk), client.h2.local_flow_control_window(stream_id))
                client.h2.send_data(stream_id, chunk[:size])
            except h2.exceptions.StreamClosedError:
                continue  # refused already
            client.flush()
    assert good_client_served(gateway)
    pings = 0

    def all_answered() -> bool:
        nonlocal pings
        if len(client.statuses()) == len(streams):
            return True
        assert client.goaway() is None, client.statuses()
        client.h2.ping(b"%08d" % pings)
        pings += 1
        client.flush()
        return False

    client.pump_until(all_answered, deadline=IDLE * 5)
    statuses = client.statuses()
    # RESOURCE_EXHAUSTED past the share, DEADLINE_EXCEEDED for the rest. On a loaded machine
    # the client can be slow enough that every message's deadline comes before the share
    # fills: then every call is cut too_slow, which is as bounded.
    assert set(statuses.values()) <= {"8", "4"} and "4" in statuses.values(), statuses
    assert time.monotonic() - started >= IDLE * 0.9 and pings >= 1
    if "8" in statuses.values():
        assert rejected(gateway, "over_budget") > over
    assert rejected(gateway, "too_slow") >= slow + list(statuses.values()).count("4")
    assert_unharmed(gateway)


def test_a_call_sitting_idle_does_not_stop_the_idle_timer(gateway: ServeProcess) -> None:
    idle = rejected(gateway, "idle_timeout")
    client = Raw(gateway)
    client.headers(1)
    body = gateway_pb2.Message(payload=b"one").SerializeToString()
    client.h2.send_data(1, b"\x00" + len(body).to_bytes(4, "big") + body)  # no END_STREAM
    client.flush()
    started = time.monotonic()

    def gone() -> bool:
        if client.goaway() is not None or client.closed:
            return True
        client.h2.ping(b"stillhere"[:8])
        client.flush()
        return False

    client.pump_until(gone, deadline=IDLE * 5)
    assert client.goaway() == (1, h2.errors.ErrorCodes.NO_ERROR)
    assert time.monotonic() - started >= IDLE * 0.5
    # At least this one (a connection left by an earlier test may idle out meanwhile).
    assert rejected(gateway, "idle_timeout") >= idle + 1
    assert good_client_served(gateway)
    assert_unharmed(gateway)


def test_streams_past_the_limit_are_refused_and_the_connection_lives(
    gateway: ServeProcess,
) -> None:
    before = rejected(gateway, "too_many_streams")
    client = Raw(gateway, read_settings=False)  # h2 would keep to the limit once it knew it
    streams = list(range(1, 2 * 140, 2))
    for stream_id in streams:
        client.headers(stream_id)
    client.flush()

    def refused() -> list[int]:
        return [
            e.stream_id
            for e in client.events
            if isinstance(e, h2.events.StreamReset)
            and e.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
        ]

    client.pump_until(lambda: len(refused()) == 12)
    assert refused() == streams[128:]
    client.h2.ping(b"alive?!!")
    client.flush()
    client.pump_until(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events))
    assert client.goaway() is None
    assert rejected(gateway, "too_many_streams") == before + 12
    assert good_client_served(gateway)
    assert_unharmed(gateway)


def test_rapid_reset_in_one_write_gets_goaway_enhance_your_calm(gateway: ServeProcess) -> None:
    before = rejected(gateway, "rapid_reset")
    client = Raw(gateway, read_settings=False)
    for stream_id in range(1, 2 * 300, 2):  # 300 HEADERS + RST_STREAM pairs, one write
        client.headers(stream_id)
        client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    client.flush()
    client.pump_until(lambda: client.goaway() is not None)
    last_stream_id, code = client.goaway() or (0, 0)
    assert code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM and last_stream_id > 2 * 200
    assert rejected(gateway, "rapid_reset") == before + 1
    assert good_client_served(gateway)
    assert_unharmed(gateway)


def test_gzip_bomblets_are_held_within_the_connection_budget(gateway: ServeProcess) -> None:
    """24 bidi calls, each a 3 KB gzip message that inflates to 3 MiB, in one write, from a
    client that opens no window for the acks: every handler stays blocked on its ack with its
    inflated batch in hand. Those batches are charged to the connection's share of the memory
    budget (8 MiB of the default 256 MiB), and the calls past it end RESOURCE_EXHAUSTED
    (over_budget): two fit, the other 22 are refused."""
    before = rejected(gateway, "over_budget")
    message = gateway_pb2.Message(payload=bytes(3 << 20)).SerializeToString()
    body = gzip.compress(message, compresslevel=9)
    compressed = b"\x01" + struct.pack(">I", len(body)) + body
    client = Raw(gateway, window=0)
    streams = list(range(1, 49, 2))
    for stream_id in streams:
        client.headers(stream_id, ("grpc-encoding", "gzip"), path=BIDI)
        client.h2.send_data(stream_id, compressed, end_stream=True)
    client.flush()
    assert good_client_served(gateway)
    client.pump_until(lambda: len(client.statuses()) >= 22)
    refused = [s for s, status in client.statuses().items() if status == "8"]
    assert rejected(gateway, "over_budget") == before + len(refused)
    assert len(refused) == 22, client.statuses()  # 24 x 3 MiB against 8 MiB
    assert_unharmed(gateway)
    client.sock.close()
