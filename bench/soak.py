"""Soak: every transport at a fixed rate for a long time; is the gateway's memory flat?

    python -m bench.soak                                  # 10 minutes, 1000 msg/s per transport
    python -m bench.soak --duration 3600 --rate 5000 --json soak.json

Starts ``python -m trio_gateway serve`` as a subprocess with a TCP, UDP, HTTP, WebSocket and
gRPC listener (sink ``null`` unless ``--sink``), and one client per transport in this process,
each sending ``--rate`` messages per second of ``--size`` bytes, paced in 10 ms slices:

* tcp: newline-framed payloads on one connection;
* udp: one datagram per message;
* http: ``POST /ingest`` with an NDJSON body of ``--http-batch`` lines, HTTP/1.1 keep-alive,
  one request in flight, every answer checked (202 counts the lines as accepted);
* websocket: masked binary frames on one connection;
* grpc: one client-streaming ``Stream`` call for the whole run over HTTP/2 (h2), within the
  server's flow-control windows; its final Ack says how many were accepted.

Every ``--sample`` seconds it reads the server's resident memory (``VmRSS`` in
``/proc/PID/status``) and CPU time, and scrapes ``/metrics`` for what each listener received
and what was dropped or refused. It prints one line per sample, then a summary: throughput
per transport (sent, received, lost), the shutdown ledger, and the verdict on memory. The
first ``--warmup`` seconds (default: a third of the run, at most 60 s) are excluded: caches
and allocator arenas fill up first. After that, RSS must not grow by more than
``--max-growth`` MiB ("flat = pass"); the exit status is 0 for pass, 1 for fail.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.soak")

import h2.config
import h2.connection
import h2.events
import trio

from trio_gateway._proto import gateway_pb2

from ._clients import ws_frame
from ._payloads import payload

REPO = Path(__file__).resolve().parent.parent
TRANSPORTS = ("tcp", "udp", "http", "websocket", "grpc")
TICK = 0.01
"""Seconds per pacing slice: each client sends ``rate * TICK`` messages per slice."""
PAGE = 4096


@dataclass
class Sample:
    t: float
    """Seconds since the clients started."""
    rss_mib: float
    cpu_seconds: float
    received: dict[str, float]
    """Messages each transport's listener has received (from /metrics)."""
    dropped: float
    rejected: float


@dataclass
class Report:
    duration: float
    rate: int
    size: int
    warmup: float
    samples: list[Sample] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    """What the transports with answers acknowledged (HTTP 202 lines, gRPC Ack count)."""
    ledger: dict[str, Any] = field(default_factory=dict)
    rss_growth_mib: float = 0.0
    rss_slope_mib_per_hour: float = 0.0
    max_growth_mib: float = 0.0

    @property
    def passed(self) -> bool:
        return self.rss_growth_mib <= self.max_growth_mib and bool(self.ledger.get("balanced"))

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["passed"] = self.passed
        return document


# -- the server under test ------------------------------------------------------------------------


class Server:
    """``serve`` in a subprocess; its stderr goes to a file so that it can never block on it."""

    def __init__(self, sink: str, extra: Sequence[str]) -> None:
        # closed in stop(); the child writes to it for the whole run
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="soak-", suffix=".log", delete=False
        )
        args = [sys.executable, "-m", "trio_gateway", "serve", "--sink", sink]
        for transport in ("tcp", "udp", "http", "ws", "grpc"):
            args += [f"--{transport}", "127.0.0.1:0"]
        args += ["--admin", "127.0.0.1:0", *extra]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=self._log, cwd=REPO, env=dict(os.environ)
        )
        self.ports: dict[str, int] = {}
        self.admin = ("127.0.0.1", 0)

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self) -> None:
        with trio.fail_after(30):
            while True:
                text = self.stderr()
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {text}")
                if ": ready\n" in text:
                    break
                await trio.sleep(0.05)
        for transport, port in re.findall(r"listening: (\w+) on \S+:(\d+)", text):
            self.ports.setdefault(transport, int(port))
        match = re.search(r"admin endpoint on http://([\d.]+):(\d+)/metrics", text)
        assert match, text
        self.admin = (match[1], int(match[2]))

    def memory(self) -> tuple[float, float]:
        """(resident MiB, CPU seconds) of the server process."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]
        fields_ = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields_[11]) + int(fields_[12])) / ticks  # utime + stime
        return rss_kib / 1024, cpu

    async def metrics(self) -> dict[str, dict[str, float]]:
        """``{metric name: {label text: value}}`` from one scrape of /metrics."""
        stream = await trio.open_tcp_stream(*self.admin)
        async with stream:
            await stream.send_all(
                b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
            )
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
        parsed: dict[str, dict[str, float]] = {}
        for line in data.partition(b"\r\n\r\n")[2].decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name, _, labels = name_labels.partition("{")
            parsed.setdefault(name, {})[labels.rstrip("}")] = float(value)
        return parsed

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait, and the shutdown ledger it printed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        text = self.stderr()
        self._log.close()
        self.log_path.unlink(missing_ok=True)
        lines = [ln for ln in text.splitlines() if ln.startswith('{"ledger"')]
        ledger: dict[str, Any] = json.loads(lines[-1])["ledger"] if lines else {}
        return ledger


# -- paced clients ---------------------------------------------------------------------------------


class Pacer:
    """How many messages are due at each 10 ms tick for ``rate`` msg/s, without drift."""

    def __init__(self, rate: int, deadline: float) -> None:
        self.rate = rate
        self.deadline = deadline
        self.start = trio.current_time()
        self.sent = 0

    async def due(self) -> int | None:
        """Wait for the next tick; how many are due now (None once the run is over)."""
        now = trio.current_time()
        if now >= self.deadline:
            return None
        next_tick = now + TICK - (now - self.start) % TICK
        await trio.sleep_until(min(next_tick, self.deadline))
        target = math.floor((min(trio.current_time(), self.deadline) - self.start) * self.rate)
        return max(0, target - self.sent)


class Messages:
    """Distinct payloads of one size, cycled (building one per message would cost the client)."""

    def __init__(self, size: int, transport: str) -> None:
        self.items = [payload(size, i) for i in range(512)]
        self.transport = transport
        self.n = 0

    def take(self, count: int) -> list[bytes]:
        items, start = self.items, self.n
        self.n += count
        return [items[(start + i) % len(items)] for i in range(count)]


async def tcp_client(port: int, pacer: Pacer, messages: Messages, report: Report) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        while (due := await pacer.due()) is not None:
            await stream.send_all(b"\n".join(messages.take(due)) + b"\n")
            pacer.sent += due
        report.sent["tcp"] = pacer.sent


async def udp_client(port: int, pacer: Pacer, messages: Messages, report: Report) -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", port))
        while (due := await pacer.due()) is not None:
            for datagram in messages.take(due):
                await sock.send(datagram)
            pacer.sent += due
        report.sent["udp"] = pacer.sent


async def http_client(
    port: int, pacer: Pacer, messages: Messages, report: Report, batch: int
) -> None:
    accepted = 0
    head = (
        b"POST /ingest HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/x-ndjson\r\n"
        % port
    )
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buffer = bytearray()

        async def answer() -> int:
            while b"\r\n\r\n" not in buffer:
                buffer.extend(await stream.receive_some(65536))
            head_end = buffer.index(b"\r\n\r\n") + 4
            length = int(re.search(rb"(?i)content-length: (\d+)", buffer[:head_end])[1])  # type: ignore[index]
            while len(buffer) < head_end + length:
                buffer.extend(await stream.receive_some(65536))
            status = int(buffer[9:12])
            body = bytes(buffer[head_end : head_end + length])
            del buffer[: head_end + length]
            return int(json.loads(body).get("accepted", 0)) if status in (202, 503) else 0

        while (due := await pacer.due()) is not None:
            while due >= batch:  # what is not due as a whole batch yet stays due
                body = b"\n".join(messages.take(batch)) + b"\n"
                await stream.send_all(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                accepted += await answer()
                pacer.sent += batch
                due -= batch
    report.sent["http"], report.accepted["http"] = pacer.sent, accepted


async def ws_client(port: int, pacer: Pacer, messages: Messages, report: Report) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" % port
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"websocket handshake refused: {head[:60]!r}")
        frames = {p: ws_frame(p) for p in messages.items}
        while (due := await pacer.due()) is not None:
            await stream.send_all(b"".join(frames[p] for p in messages.take(due)))
            pacer.sent += due
        await stream.send_all(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000, masked
        with trio.move_on_after(5):
            while await stream.receive_some(4096):
                pass
    report.sent["websocket"] = pacer.sent


async def grpc_client(port: int, pacer: Pacer, messages: Messages, report: Report) -> None:
    """One client-streaming ``Stream`` call over HTTP/2, within the server's windows."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    call = 1
    conn.send_headers(
        call,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/trio_gateway.v1.Gateway/Stream"),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    window = trio.Event()
    ack: dict[str, int] = {}
    done = trio.Event()
    encoded: dict[bytes, bytes] = {}
    for p in messages.items:
        body = gateway_pb2.Message(payload=p).SerializeToString()
        encoded[p] = b"\x00" + len(body).to_bytes(4, "big") + body
    send_lock = trio.Lock()  # the reader answers (acks, window updates) too
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:

        async def flush() -> None:
            async with send_lock:
                if data := conn.data_to_send():
                    await stream.send_all(data)

        async def read() -> None:
            nonlocal window
            while data := await stream.receive_some(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                        window.set()
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, call)
                        reply = gateway_pb2.Ack.FromString(event.data[5:])
                        ack["accepted"] = reply.accepted_count
                    elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                        done.set()
                await flush()
            done.set()

        async with trio.open_nursery() as nursery:
            await flush()
            nursery.start_soon(read)
            while (due := await pacer.due()) is not None:
                data = b"".join(encoded[p] for p in messages.take(due))
                while data:
                    size = min(
                        conn.local_flow_control_window(call),
                        conn.max_outbound_frame_size,
                        len(data),
                    )
                    if size <= 0:
                        window = trio.Event()
                        await window.wait()
                        continue
                    conn.send_data(call, data[:size])
                    data = data[size:]
                    await flush()
                pacer.sent += due
            conn.end_stream(call)
            await flush()
            with trio.move_on_after(10):
                await done.wait()
            nursery.cancel_scope.cancel()
    report.sent["grpc"], report.accepted["grpc"] = pacer.sent, ack.get("accepted", 0)


# -- the run ---------------------------------------------------------------------------------------


def received_by_transport(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    received: dict[str, float] = dict.fromkeys(TRANSPORTS, 0.0)
    for labels, value in metrics.get("trio_gateway_received_messages_total", {}).items():
        match = re.search(r'transport="(\w+)"', labels)
        if match and match[1] in received:
            received[match[1]] += value
    return received


def analyse(report: Report) -> None:
    """RSS growth after the warm-up: the largest rise over the first post-warm-up sample, and
    the least-squares slope (MiB per hour) over the post-warm-up samples."""
    after = [s for s in report.samples if s.t >= report.warmup]
    if len(after) < 2:
        return
    base = after[0].rss_mib
    report.rss_growth_mib = round(max(s.rss_mib for s in after) - base, 2)
    n = len(after)
    mean_t = sum(s.t for s in after) / n
    mean_r = sum(s.rss_mib for s in after) / n
    var = sum((s.t - mean_t) ** 2 for s in after)
    if var:
        slope = sum((s.t - mean_t) * (s.rss_mib - mean_r) for s in after) / var
        report.rss_slope_mib_per_hour = round(slope * 3600, 2)


def say(line: str, quiet: bool) -> None:
    if not quiet:
        print(line, flush=True)


async def soak(
    *,
    duration: float = 600.0,
    rate: int = 1000,
    size: int = 256,
    sample: float = 5.0,
    warmup: float | None = None,
    max_growth: float = 16.0,
    http_batch: int = 20,
    sink: str = "null",
    serve_args: Sequence[str] = (),
    quiet: bool = False,
) -> Report:
    """Run the soak and return its report (``report.passed`` is the verdict)."""
    warm = warmup if warmup is not None else min(60.0, duration / 3)
    report = Report(duration, rate, size, warm, max_growth_mib=max_growth)
    server = Server(sink, serve_args)
    try:
        await server.wait_ready()
        say(
            f"soak: serve pid {server.proc.pid}, {rate} msg/s x {len(TRANSPORTS)} transports, "
            f"{size} B, {duration:.0f} s (warm-up {warm:.0f} s)",
            quiet,
        )
        say(
            f"{'t s':>6} {'RSS MiB':>8} {'CPU %':>6} "
            + " ".join(f"{t:>10}" for t in TRANSPORTS)
            + f" {'dropped':>8} {'refused':>8}",
            quiet,
        )
        started = trio.current_time()
        deadline = started + duration
        ports = server.ports
        clients = [
            (tcp_client, ports["tcp"]),
            (udp_client, ports["udp"]),
            (ws_client, ports["websocket"]),
            (grpc_client, ports["grpc"]),
        ]
        async with trio.open_nursery() as nursery:
            for client, port in clients:
                transport = client.__name__.removesuffix("_client").replace("ws", "websocket")
                nursery.start_soon(
                    client, port, Pacer(rate, deadline), Messages(size, transport), report
                )
            nursery.start_soon(
                http_client,
                ports["http"],
                Pacer(rate, deadline),
                Messages(size, "http"),
                report,
                http_batch,
            )
            last_cpu, last_t, last_received = 0.0, 0.0, dict.fromkeys(TRANSPORTS, 0.0)
            while trio.current_time() < deadline + sample / 2:
                await trio.sleep(sample)
                t = trio.current_time() - started
                rss, cpu = server.memory()
                metrics = await server.metrics()
                received = received_by_transport(metrics)
                dropped = sum(metrics.get("trio_gateway_dropped_messages_total", {}).values())
                rejected = sum(metrics.get("trio_gateway_rejected_messages_total", {}).values())
                report.samples.append(
                    Sample(round(t, 2), round(rss, 2), round(cpu, 2), received, dropped, rejected)
                )
                rates = " ".join(
                    f"{(received[tr] - last_received[tr]) / (t - last_t):>8.0f}/s"
                    for tr in TRANSPORTS
                )
                cpu_pct = 100 * (cpu - last_cpu) / (t - last_t)
                counts = f"{dropped:>8.0f} {rejected:>8.0f}"
                say(f"{t:>6.0f} {rss:>8.1f} {cpu_pct:>6.0f} {rates} {counts}", quiet)
                last_cpu, last_t, last_received = cpu, t, received
    finally:
        report.ledger = server.stop()
    analyse(report)
    return report


def summary(report: Report) -> str:
    final = report.samples[-1].received if report.samples else {}
    lines = ["", f"{'transport':<10} {'sent':>10} {'received':>10} {'lost':>8} {'acked':>10}"]
    for transport in TRANSPORTS:
        sent = report.sent.get(transport, 0)
        got = int(final.get(transport, 0))
        acked = report.accepted.get(transport)
        lines.append(
            f"{transport:<10} {sent:>10} {got:>10} {sent - got:>8} "
            f"{'-' if acked is None else acked:>10}"
        )
    per_second = sum(report.sent.values()) / report.duration if report.duration else 0
    lines.append(f"throughput: {per_second:.0f} msg/s offered in total")
    lines.append(f"ledger: {json.dumps(report.ledger)}")
    window = report.duration - report.warmup
    # a slope over less than two minutes extrapolates noise to an hour: only the growth then
    slope = f"slope {report.rss_slope_mib_per_hour:+.1f} MiB/h; " if window >= 120 else ""
    lines.append(
        f"RSS after warm-up: grew {report.rss_growth_mib:.1f} MiB "
        f"({slope}bound {report.max_growth_mib} MiB): "
        + ("PASS (flat)" if report.passed else "FAIL")
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (600)")
    parser.add_argument("--rate", type=int, default=1000, help="messages per second per transport")
    parser.add_argument("--size", type=int, default=256, help="payload bytes (256)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples (5)")
    parser.add_argument("--warmup", type=float, help="seconds left out of the verdict")
    parser.add_argument("--max-growth", type=float, default=16.0, help="MiB of RSS growth allowed")
    parser.add_argument("--http-batch", type=int, default=20, help="NDJSON lines per request")
    parser.add_argument("--sink", default="null", help="the gateway's sink (null)")
    parser.add_argument("--json", type=Path, help="write the samples and the verdict here")
    args, serve_args = parser.parse_known_args(argv)
    report = trio.run(
        lambda: soak(
            duration=args.duration,
            rate=args.rate,
            size=args.size,
            sample=args.sample,
            warmup=args.warmup,
            max_growth=args.max_growth,
            http_batch=args.http_batch,
            sink=args.sink,
            serve_args=serve_args,
        )
    )
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=1))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
