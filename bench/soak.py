"""Soak: every transport at a fixed rate for a long time; is the gateway's memory flat?

    python -m bench.soak                                  # 10 minutes, 1000 msg/s per transport
    python -m bench.soak --duration 3600 --rate 5000 --json soak.json

Starts ``python -m trio_gateway serve`` as a subprocess with a TCP, UDP, HTTP, WebSocket and
gRPC listener (sink ``null`` unless ``--sink``), and one client per transport in this process,
each sending ``--rate`` messages per second of ``--size`` bytes. The clients are
:mod:`trio_gateway.loadgen`, what ``python -m trio_gateway send`` runs, each on one connection:

* tcp: newline-framed payloads;
* udp: one datagram per message;
* http: ``POST /ingest`` with an NDJSON body of ``--http-batch`` lines, HTTP/1.1 keep-alive,
  every answer checked (202 counts the lines as accepted);
* websocket: binary messages, then a clean close;
* grpc: one client-streaming ``Stream`` call for the whole run; its final Ack says how many
  were accepted.

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
from functools import partial
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.soak")

import trio

from trio_gateway.loadgen import send

REPO = Path(__file__).resolve().parent.parent
TRANSPORTS = ("tcp", "udp", "http", "websocket", "grpc")
ANSWERED = ("http", "grpc")
"""The transports whose acceptance the report records (HTTP 202 lines, the gRPC final Ack)."""
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


# -- the clients: trio_gateway.loadgen, what `send` runs ----------------------------------------


async def run_client(
    transport: str, port: int, report: Report, *, duration: float, http_batch: int
) -> None:
    """``rate * duration`` messages at the report's rate and size over one connection."""
    targets: dict[str, tuple[str, str, dict[str, Any]]] = {
        "tcp": ("tcp", f"127.0.0.1:{port}", {}),
        "udp": ("udp", f"127.0.0.1:{port}", {}),
        "http": ("http", f"http://127.0.0.1:{port}/ingest", {"ndjson": http_batch}),
        "websocket": ("ws", f"ws://127.0.0.1:{port}/", {}),
        "grpc": ("grpc", f"127.0.0.1:{port}", {"mode": "stream"}),
    }
    kind, target, options = targets[transport]
    count = math.floor(report.rate * duration)
    summary = await send(kind, target, count=count, size=report.size, rate=report.rate, **options)
    report.sent[transport] = summary.messages if summary.sent is None else summary.sent
    if transport in ANSWERED:
        report.accepted[transport] = summary.accepted or 0


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
        async with trio.open_nursery() as nursery:
            for transport in TRANSPORTS:
                nursery.start_soon(
                    partial(
                        run_client,
                        transport,
                        server.ports[transport],
                        report,
                        duration=duration,
                        http_batch=http_batch,
                    )
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
