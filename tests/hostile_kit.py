"""Hostile peers against ``serve`` as a subprocess, shared by tests/e2e/test_hostile_*.py and
bench/hostile.py: the attack clients (raw sockets, raw HTTP/2 frames through h2's client side),
a well-behaved client timing its requests, peak RSS from ``/proc/PID/status`` and the refusal
counters from ``/metrics``.

Each attack is a plain ``async`` function taking the address and its scale, returning what the
attacker saw (cut or not, when, with which ``GOAWAY``), so the tests assert on it and the bench
prints it. Nothing here imports pytest.
"""

from __future__ import annotations

import gzip
import json
import statistics
import struct
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from helpers import ServeProcess, parse_samples, sample_value
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame

Address = tuple[str, int]
INGEST = "/ingest"
GRPC_STREAM = "/trio_gateway.v1.Gateway/Stream"
GRPC_BIDI = "/trio_gateway.v1.Gateway/StreamAcked"
GRPC_SEND = "/trio_gateway.v1.Gateway/Send"

GATEWAY_TOML = """\
[gateway]
grace_period = 1.0
drain_timeout = 5.0

[sink]
url = "null"

[admin]
listen = "127.0.0.1:0"

[[sources]]
transport = "tcp"
listen = "127.0.0.1:0"
max_connections = {max_connections}
idle_timeout = {idle_timeout}

[[sources]]
transport = "udp"
listen = "127.0.0.1:0"

[[sources]]
transport = "http"
listen = "127.0.0.1:0"
max_connections = {max_connections}
idle_timeout = {idle_timeout}

[[sources]]
transport = "websocket"
listen = "127.0.0.1:0"
max_connections = {max_connections}
idle_timeout = {idle_timeout}

[[sources]]
transport = "grpc"
listen = "127.0.0.1:0"
max_connections = {max_connections}
idle_timeout = {idle_timeout}
"""


class Gateway(ServeProcess):
    """``serve`` with every listener on (port 0), the null sink and the admin endpoint; its
    log is read on a thread (a busy log would fill the pipe and stall the gateway)."""

    def __init__(self, directory: Path, *, idle_timeout: float, max_connections: int) -> None:
        config = directory / "hostile.toml"
        config.write_text(
            GATEWAY_TOML.format(idle_timeout=idle_timeout, max_connections=max_connections)
        )
        super().__init__(["--config", str(config)])
        self._reader = threading.Thread(target=self._drain_log, daemon=True)
        self._reader.start()

    def _drain_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode(errors="replace"))

    def stop(self, sig: int = 15, timeout: float = 30.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode, "".join(self.stderr_lines)

    def address(self, transport: str) -> Address:
        return ("127.0.0.1", self.port(transport))

    def rejected(self, reason: str, transport: str | None = None) -> float:
        """A refusal counter from ``/metrics`` (summed over listeners, or one transport's)."""
        samples = parse_samples(self.metrics())
        name = "trio_gateway_rejected_messages_total"
        if transport is None:
            return sample_value(samples, name, reason=reason)
        port = str(self.port(transport))
        return sum(
            value
            for labels, value in samples.get(name, {}).items()
            if ("reason", reason) in labels and any(v.endswith(":" + port) for _, v in labels)
        )

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port('admin')}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def peak_rss_mib(self) -> float:
        """The process's peak resident memory (``VmHWM``) in MiB."""
        return _status_kib(self.proc.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return _status_kib(self.proc.pid, "VmRSS") / 1024

    def reset_peak_rss(self) -> None:
        """Start ``VmHWM`` again from the current RSS (Linux: ``clear_refs`` 5)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def ledger_of(log: str) -> dict[str, object]:
    """The shutdown ledger ``serve`` logs as its last JSON line."""
    lines = [line for line in log.splitlines() if line.startswith('{"ledger"')]
    assert lines, log[-2000:]
    ledger: dict[str, object] = json.loads(lines[-1])["ledger"]
    return ledger


# -- the well-behaved client ------------------------------------------------------------------


@dataclass
class GoodClient:
    """HTTP/1.1 ``POST`` requests, each on a new connection (as a new client would come),
    one after another, timed from connect to the last byte of the answer; with ``kind``
    ``"grpc"``, grpcio unary ``Send`` calls, each on a channel of its own (only
    :meth:`run_elsewhere`)."""

    address: Address
    kind: str = "http"
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    async def run(self, duration: float, *, pause: float = 0.01) -> None:
        end = trio.current_time() + duration
        sequence = 0
        while trio.current_time() < end:
            sequence += 1
            await self.request(b"good-%d" % sequence)
            await trio.sleep(pause)

    async def request(self, payload: bytes, *, patience: float = 10.0) -> int:
        start = time.perf_counter()
        head = b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
            INGEST.encode(),
            len(payload),
        )
        try:
            with trio.fail_after(patience):
                async with await trio.open_tcp_stream(*self.address) as stream:
                    await stream.send_all(head + payload)
                    answer = b""
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.failures[type(exc).__name__] += 1
            return 0
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        self.statuses[status] += 1
        if status == 202:
            self.latencies.append(time.perf_counter() - start)
        else:
            self.failures[f"status {status}"] += 1
        return status

    async def run_elsewhere(self, duration: float) -> None:
        """:meth:`run` in a process of its own (this file run as a script), so that the
        attackers' CPU in this process does not show in the good client's latencies."""
        done = await trio.run_process(
            [sys.executable, __file__, "good", *map(str, self.address), str(duration), self.kind],
            capture_stdout=True,
        )
        report = json.loads(done.stdout)
        self.latencies += report["latencies"]
        self.statuses.update({int(k): v for k, v in report["statuses"].items()})
        self.failures.update(report["failures"])

    def percentile(self, fraction: float) -> float:
        """Latency in seconds at ``fraction`` (0.5, 0.99) of the served requests."""
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        points = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return points[min(98, max(0, round(fraction * 100) - 1))]


# -- raw HTTP/2 -------------------------------------------------------------------------------


def _h2_client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    client.initiate_connection()
    return client


def _request_headers(length: int | None = None, *, grpc: str = "") -> list[tuple[str, str]]:
    """An HTTP request's headers, or with ``grpc`` (a method path) a gRPC call's."""
    path = grpc or INGEST
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x")]
    if grpc:
        headers += [("content-type", "application/grpc"), ("te", "trailers")]
    if length is not None:
        headers.append(("content-length", str(length)))
    return headers


@dataclass
class Outcome:
    """What an attacking connection saw: whether and when the server ended it, and how."""

    cut_after: float | None = None
    goaway_code: int | None = None
    goaway_last_stream: int | None = None
    resets: Counter[int] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    ended: int = 0
    """Responses complete (their stream ended)."""
    sent_bytes: int = 0
    took: float = 0.0
    """Seconds the attack ran."""


def _absorb(client: h2.connection.H2Connection, data: bytes, outcome: Outcome) -> None:
    try:
        events = client.receive_data(data)
    except h2.exceptions.ProtocolError:
        return
    for event in events:
        if isinstance(event, h2.events.ConnectionTerminated):
            outcome.goaway_code = int(event.error_code or 0)
            outcome.goaway_last_stream = event.last_stream_id
        elif isinstance(event, h2.events.StreamReset):
            outcome.resets[int(event.error_code)] += 1
        elif isinstance(event, h2.events.ResponseReceived):
            outcome.statuses[int(dict(event.headers)[":status"])] += 1  # type: ignore[arg-type]
        elif isinstance(event, h2.events.StreamEnded):
            outcome.ended += 1
        elif isinstance(event, h2.events.DataReceived):  # as a client does: window reopened
            client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)


async def _receive(stream: trio.abc.Stream, seconds: float) -> bytes | None:
    """What came within ``seconds`` (``b""``: nothing yet), ``None`` once closed."""
    with trio.move_on_after(seconds):
        try:
            data = bytes(await stream.receive_some(65536))
        except (trio.BrokenResourceError, OSError):
            return None
        return data if data else None
    return b""


async def h2_body_stall(
    address: Address,
    *,
    streams: int = 100,
    body_size: int = 1_000_000,
    duration: float = 5.0,
    ping_every: float = 0.2,
    grpc: bool = False,
) -> Outcome:
    """One connection opens ``streams`` requests and sends up to ``body_size`` bytes of each
    body, as far as the server's flow-control windows allow, never ending them; PINGs keep
    the connection busy. The server should cut it (a body must finish in time). With
    ``grpc``, streaming calls, each a message announced at 4 MiB that never completes."""
    outcome = Outcome()
    client = _h2_client()
    stream_ids = [1 + 2 * index for index in range(streams)]
    left = dict.fromkeys(stream_ids, body_size)
    start = trio.current_time()
    chunk = b"x" * 16384
    async with await trio.open_tcp_stream(*address) as stream:
        for stream_id in stream_ids:
            client.send_headers(stream_id, _request_headers(grpc=GRPC_STREAM if grpc else ""))
            if grpc:  # the message's prefix: uncompressed, 4 MiB
                client.send_data(stream_id, b"\x00" + (4 << 20).to_bytes(4, "big"))
        next_ping = start
        while trio.current_time() - start < duration:
            sent = outcome.sent_bytes
            for stream_id in stream_ids:
                size = min(
                    left[stream_id],
                    client.local_flow_control_window(stream_id),
                    client.max_outbound_frame_size,
                )
                if size > 0:
                    try:
                        client.send_data(stream_id, chunk[:size])
                    except h2.exceptions.H2Error:
                        left[stream_id] = 0
                        continue
                    left[stream_id] -= size
                    outcome.sent_bytes += size
            if trio.current_time() >= next_ping:
                client.ping(b"stall!!!")
                next_ping += ping_every
            try:
                await stream.send_all(client.data_to_send())
            except (trio.BrokenResourceError, OSError):
                outcome.cut_after = trio.current_time() - start
                return outcome
            # no window left: wait for the server (a WINDOW_UPDATE) or the next PING
            idle = max(0.001, next_ping - trio.current_time())
            data = await _receive(stream, 0.001 if outcome.sent_bytes > sent else idle)
            if data:
                _absorb(client, data, outcome)
            closed = client.state_machine.state is h2.connection.ConnectionState.CLOSED
            if data is None or outcome.goaway_code is not None or closed:
                outcome.cut_after = trio.current_time() - start
                await _read_to_end(client, stream, outcome)
                return outcome
    return outcome


async def _read_to_end(
    client: h2.connection.H2Connection, stream: trio.abc.Stream, outcome: Outcome
) -> None:
    """What the server still sends before it closes (at most a few seconds)."""
    with trio.move_on_after(3):
        while data := await _receive(stream, 3):
            _absorb(client, data, outcome)


async def h2_slowloris(
    address: Address, *, interval: float = 2.0, duration: float = 10.0
) -> Outcome:
    """The connection preface and SETTINGS at once, then a request's HEADERS frame one byte
    every ``interval`` (the request never completes; nothing else is sent)."""
    outcome = Outcome()
    client = _h2_client()
    preface = client.data_to_send()
    client.send_headers(1, _request_headers(), end_stream=True)
    data = client.data_to_send()
    start = trio.current_time()
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(preface)
        for index in range(len(data)):
            if trio.current_time() - start >= duration:
                return outcome
            answer = await _receive(stream, interval)
            if answer:
                _absorb(client, answer, outcome)
            if answer is None or outcome.goaway_code is not None:
                break
            try:
                await stream.send_all(data[index : index + 1])
            except (trio.BrokenResourceError, OSError):
                break
        else:
            return outcome
        outcome.cut_after = trio.current_time() - start
        await _read_to_end(client, stream, outcome)
    return outcome


# A request's header block from HPACK's static table and literals without indexing (no
# dynamic-table state, so it can be repeated on any stream): :method POST, :scheme http,
# :path /ingest, :authority x.
_HEADER_BLOCK = b"\x83\x86\x04\x07/ingest\x01\x01x"
# The same for a gRPC streaming call: its :path, content-type (static index 31) and te.
_GRPC_HEADER_BLOCK = (
    b"\x83\x86\x04" + bytes([len(GRPC_STREAM)]) + GRPC_STREAM.encode() + b"\x01\x01x"
    b"\x0f\x10\x10application/grpc\x00\x02te\x08trailers"
)
_HEADERS_HEAD = struct.Struct(">I")


def rapid_reset_pairs(first_stream: int, count: int, *, grpc: bool = False) -> bytes:
    """``count`` HEADERS + RST_STREAM(CANCEL) pairs from ``first_stream`` on, as raw frames
    (built without h2: an attacker does not pay for a state machine); with ``grpc``, each
    HEADERS opens a gRPC streaming call."""
    block = _GRPC_HEADER_BLOCK if grpc else _HEADER_BLOCK
    headers = (
        len(block).to_bytes(3, "big") + b"\x01\x04"  # HEADERS, END_HEADERS
    )
    reset = b"\x00\x00\x04\x03\x00"  # RST_STREAM, 4 bytes
    cancel = b"\x00\x00\x00\x08"
    parts = []
    for stream_id in range(first_stream, first_stream + 2 * count, 2):
        sid = _HEADERS_HEAD.pack(stream_id)
        parts += (headers, sid, block, reset, sid, cancel)
    return b"".join(parts)


def split_frames(buffer: bytearray) -> list[Frame]:
    """The whole frames at the start of ``buffer`` (removed from it), parsed."""
    frames = []
    while len(buffer) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(buffer)[:9])
        if len(buffer) < 9 + length:
            break
        frame.parse_body(memoryview(bytes(buffer[9 : 9 + length])))
        frames.append(frame)
        del buffer[: 9 + length]
    return frames


async def h2_rapid_reset(
    address: Address, *, pairs_per_write: int = 500, writes: int = 20, grpc: bool = False
) -> Outcome:
    """HEADERS + RST_STREAM pairs, ``pairs_per_write`` in each write (CVE-2023-44487)."""
    outcome = Outcome()
    client = _h2_client()  # for its preface and SETTINGS only
    start = trio.current_time()
    received = bytearray()
    data: bytes | None = b""

    def absorb(data: bytes) -> None:
        received.extend(data)
        for frame in split_frames(received):
            if isinstance(frame, GoAwayFrame):
                outcome.goaway_code = frame.error_code
                outcome.goaway_last_stream = frame.last_stream_id
            elif isinstance(frame, RstStreamFrame):
                outcome.resets[frame.error_code] += 1

    async with await trio.open_tcp_stream(*address) as stream:
        preface = client.data_to_send()
        for index in range(writes):
            first = 1 + 2 * pairs_per_write * index
            try:
                await stream.send_all(
                    preface + rapid_reset_pairs(first, pairs_per_write, grpc=grpc)
                )
            except (trio.BrokenResourceError, OSError):
                data = None
                break
            preface = b""
            data = await _receive(stream, 0.001)
            if data:
                absorb(data)
            if data is None or outcome.goaway_code is not None:
                break
        else:
            while outcome.goaway_code is None and (data := await _receive(stream, 1.0)):
                absorb(data)
        if outcome.goaway_code is not None or data is None:
            outcome.cut_after = trio.current_time() - start
    return outcome


async def grpc_bomblets(address: Address, *, calls: int = 24, duration: float = 5.0) -> Outcome:
    """``calls`` bidi calls in one write, each one gzip message of 3 KB that inflates to
    3 MiB, from a client that opens no window for the acks (every handler stays blocked on
    its ack with its inflated batch in hand); the connection then sits for ``duration``."""
    from trio_gateway._proto import gateway_pb2

    outcome = Outcome()
    client = _h2_client()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    message = gateway_pb2.Message(payload=bytes(3 << 20)).SerializeToString()
    body = gzip.compress(message, compresslevel=9)
    framed = b"\x01" + struct.pack(">I", len(body)) + body
    headers = [*_request_headers(grpc=GRPC_BIDI), ("grpc-encoding", "gzip")]
    start = trio.current_time()
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(client.data_to_send())
        # the server's SETTINGS and WINDOW_UPDATE first: the calls need more than 64 KiB
        with trio.move_on_after(2):
            while client.outbound_flow_control_window < calls * len(framed):
                data = await _receive(stream, 0.2)
                if data is None:
                    outcome.cut_after = trio.current_time() - start
                    return outcome
                _absorb(client, data, outcome)
        for index in range(calls):
            client.send_headers(1 + 2 * index, headers)
            client.send_data(1 + 2 * index, framed, end_stream=True)
        await stream.send_all(client.data_to_send())
        outcome.sent_bytes = calls * len(framed)
        while trio.current_time() - start < duration:
            data = await _receive(stream, 0.2)
            if data is None:
                outcome.cut_after = trio.current_time() - start
                break
            if data:
                _absorb(client, data, outcome)
    return outcome


async def h2_sequential(address: Address, count: int, *, patience: float = 5.0) -> Outcome:
    """``count`` requests one after another on one connection, each waiting for its answer
    (as Go's ``x/net/http2`` client sends them); a request not answered in ``patience``
    seconds ends the run (``cut_after``)."""
    outcome = Outcome()
    client = _h2_client()
    start = trio.current_time()
    async with await trio.open_tcp_stream(*address) as stream:
        for index in range(count):
            stream_id = 1 + 2 * index
            payload = b"seq-%d" % index
            client.send_headers(stream_id, _request_headers(len(payload)))
            client.send_data(stream_id, payload, end_stream=True)
            await stream.send_all(client.data_to_send())
            answered = outcome.ended
            with trio.move_on_after(patience):
                while outcome.ended == answered:
                    data = await _receive(stream, patience)
                    if not data:
                        break
                    _absorb(client, data, outcome)
                    await stream.send_all(client.data_to_send())
            if outcome.ended == answered:
                outcome.cut_after = trio.current_time() - start
                break
    outcome.took = trio.current_time() - start
    return outcome


# -- raw TCP ----------------------------------------------------------------------------------


async def idle_connections(address: Address, count: int) -> list[trio.SocketStream]:
    """``count`` connections that send nothing (the caller closes them)."""
    streams = []
    for _ in range(count):
        try:
            streams.append(await trio.open_tcp_stream(*address))
        except OSError:
            break
    return streams


async def closed_by_server(streams: list[trio.SocketStream]) -> int:
    """How many of ``streams`` the server has closed (a read that ends or fails at once)."""
    closed = 0
    for stream in streams:
        data = await _receive(stream, 0.001)
        if data is None:
            closed += 1
    return closed


def _good_main(host: str, port: str, duration: str, kind: str = "http") -> None:
    good = GoodClient((host, int(port)), kind)
    if kind == "grpc":
        _good_grpc(good, float(duration))
    else:
        trio.run(good.run, float(duration))
    report = {"latencies": good.latencies, "statuses": good.statuses, "failures": good.failures}
    print(json.dumps(report))


def _good_grpc(good: GoodClient, duration: float, *, pause: float = 0.01) -> None:
    """grpcio unary calls, each on a new channel (a new connection), timed from the channel's
    creation to the Ack; status 0 is OK, as gRPC numbers them."""
    import grpc

    from trio_gateway._proto import gateway_pb2

    target = f"{good.address[0]}:{good.address[1]}"
    end = time.monotonic() + duration
    sequence = 0
    while time.monotonic() < end:
        sequence += 1
        start = time.perf_counter()
        try:
            with grpc.insecure_channel(target) as channel:
                send = channel.unary_unary(
                    GRPC_SEND,
                    request_serializer=gateway_pb2.Message.SerializeToString,
                    response_deserializer=gateway_pb2.Ack.FromString,
                )
                send(gateway_pb2.Message(payload=b"good", sequence=sequence), timeout=10)
        except grpc.RpcError as exc:
            good.failures[f"status {exc.code().name}"] += 1  # type: ignore[attr-defined]
        else:
            good.statuses[0] += 1
            good.latencies.append(time.perf_counter() - start)
        time.sleep(pause)


if __name__ == "__main__" and sys.argv[1:2] == ["good"]:
    _good_main(*sys.argv[2:6])
