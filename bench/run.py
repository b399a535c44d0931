"""The talk's two benchmark tables, on trio_gateway, beside plain asyncio peers.

    python -m bench [--quick | --smoke] [--repeats N] [--parallel N] [--out DIR] [--only ROW ...]

Table 1, transports: ns per message for each transport x (parallel sending no/yes) x message
size (18, 4266, 6786, 79435 bytes). Every trio_gateway row is measured beside a plain asyncio
implementation of the same path, in the same run, interleaved repeat by repeat. Table 2,
queues: ns per put + get for the four queues (``python -m bench.queues``). Extras: a C-speed
reader (``socat``) for raw TCP, a uvloop peer for UDP, TCP into the JSON Lines file sink, and
the cost of the JSON Lines encoding alone.

Method (each point is also in docs/benchmarks.md):

* one op = one message enqueued at the server (the file-sink rows: one record written);
* every server runs in a fresh process per (row, size); the clients are other processes, one
  connection each; "parallel" = ``--parallel`` connections (default: the number of cores);
* the runner arms the server's count, starts the clients at once, and the count-down ends
  when the server has enqueued them all; elapsed = that moment minus the start signal. A
  run that does not finish within its timeout is recorded as such (never hangs the bench);
* UDP: the count-down ends when every message arrived or the count stopped moving for
  ``SETTLE`` seconds after the senders finished; the lost fraction is reported, and ns/op
  is per message received. Sizes over 65,507 bytes are N/A;
* unary HTTP uses keep-alive, one request in flight per connection;
* per (row, size, parallel, implementation): one warm-up run that also sizes the measured
  runs (one count for every implementation of the case: ``target`` seconds for the slowest,
  at least half of it for the fastest), then ``repeats`` runs, interleaved; the median is
  reported, with the spread ((max - min) / 2 / median) in the JSON;
* the server's CPU time per op is measured too (``time.process_time`` in the server): on a
  shared machine it moves less than the wall clock.

Outputs (under ``--out``, the repository root by default for a full run): ``docs/benchmarks.md``
(the generated blocks between ``<!-- bench:NAME -->`` markers are replaced, the prose kept),
``docs/img/bench-*.png`` and ``bench/results/<date>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # `python bench/run.py`: Python runs this file alone, with bench/ first on sys.path (where
    # http.py and grpc.py would shadow the modules of those names). Run the package instead,
    # exactly as `python -m bench` does.
    import runpy

    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    runpy.run_module("bench", run_name="__main__", alter_sys=True)

from ._payloads import SIZES

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MAX_UDP = 65_507
SETTLE = 0.15
SCHEMA = 1


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    server: str
    client: str
    impls: tuple[str, ...] = ("trio_gateway", "asyncio")
    sink: str = "null"
    peer_name: str = "asyncio"
    inflight: tuple[int, ...] = ()
    """Empty: the talk's two cases, one connection and ``--parallel`` connections (one request
    in flight each). Else the wire rows' cases: one client process with 1, then N, requests
    or calls in flight (``parallel`` is True for the second; ``Result.inflight`` says N)."""

    @property
    def lossy(self) -> bool:
        return self.server == "udp"

    @property
    def wire(self) -> bool:
        return bool(self.inflight)

    def described(self) -> dict[str, Any]:
        """The row as a results document lists it (what the report reads)."""
        return {
            "key": self.key,
            "title": self.title,
            "peer": self.peer_name,
            "impls": list(self.impls),
            "inflight": list(self.inflight),
            "names": {impl: IMPL_NAMES[impl] for impl in self.impls if impl in IMPL_NAMES},
        }


GRPC_PEERS = ("trio_gateway", "grpcio", "asyncio")
HTTP_PEERS = ("trio_gateway", "uvicorn-httptools", "uvicorn-h11", "asyncio")
IMPL_NAMES = {
    "grpcio": "grpcio (grpc.aio, C core)",
    "uvicorn-httptools": "uvicorn + httptools (uvloop)",
    "uvicorn-h11": "uvicorn + h11 (asyncio)",
    "uvloop": "uvloop DatagramProtocol",
}
"""Report names of the implementations that are not a row's own ``asyncio`` peer."""


ROWS: tuple[Row, ...] = (
    Row("http", "Unary HTTP", "http", "http", peer_name="hypercorn (asyncio)"),
    Row("grpc-unary", "Unary gRPC", "grpc", "grpc-unary", peer_name="grpclib (asyncio)"),
    Row(
        "udp",
        "UDP",
        "udp",
        "udp",
        impls=("trio_gateway", "asyncio", "uvloop"),
        peer_name="asyncio DatagramProtocol",
    ),
    Row("tcp", "Streaming TCP", "tcp", "tcp", peer_name="asyncio Protocol"),
    Row("ws", "Streaming WebSocket", "ws", "ws", peer_name="websockets (asyncio)"),
    Row(
        "grpc-frames",
        "Streaming gRPC",
        "grpc",
        "grpc-frames",
        impls=GRPC_PEERS,
        peer_name="grpclib (asyncio)",
    ),
    Row(
        "grpc-stream",
        "Streaming gRPC, batched DATA frames",
        "grpc",
        "grpc-stream",
        peer_name="grpclib (asyncio)",
    ),
    Row(
        "tcp-file",
        "Streaming TCP into the file sink",
        "tcp",
        "tcp",
        sink="file",
        peer_name="asyncio Protocol + JSONL writer",
    ),
    Row(
        "grpc-send",
        "Unary gRPC, `Send`",
        "grpc",
        "grpc-unary",
        impls=GRPC_PEERS,
        peer_name="grpclib (asyncio)",
        inflight=(1, 16),
    ),
    Row(
        "grpc-make",
        "Unary gRPC, the talk's `MakeRequest`",
        "grpc",
        "grpc-make",
        impls=GRPC_PEERS,
        peer_name="grpclib (asyncio)",
        inflight=(1, 16),
    ),
    Row(
        "http-wire",
        "Unary HTTP/1.1, keep-alive",
        "http",
        "http",
        impls=HTTP_PEERS,
        peer_name="hypercorn (asyncio)",
        inflight=(1, 16),
    ),
    Row(
        "h2c",
        "Unary h2c (HTTP/2, prior knowledge)",
        "http",
        "h2c",
        peer_name="hypercorn (asyncio)",
        inflight=(1, 16),
    ),
)
ROW_KEYS = tuple(row.key for row in ROWS)


@dataclass(frozen=True)
class Mode:
    name: str
    repeats: int
    target: float
    """Seconds one measured run should last (from the warm-up's rate)."""
    warm_bytes: int
    sizes: tuple[int, ...] = SIZES
    parallel_modes: tuple[bool, ...] = (False, True)
    file_parallel: tuple[bool, ...] = (False,)
    socat_sizes: tuple[int, ...] = SIZES
    queue_args: tuple[str, ...] = ()
    jsonl_messages: int = 200_000
    wire_sizes: tuple[int, ...] = (SIZES[0], SIZES[1])
    """Sizes of the wire rows (calls in flight, every peer)."""


MODES = {
    "full": Mode("full", repeats=5, target=0.5, warm_bytes=8 << 20),
    "quick": Mode(
        "quick",
        repeats=1,
        target=0.05,
        warm_bytes=1 << 20,
        socat_sizes=(SIZES[-1],),
        queue_args=("--quick", "--repeats", "1"),
        jsonl_messages=20_000,
        wire_sizes=(SIZES[0],),
    ),
    "smoke": Mode(
        "smoke",
        repeats=1,
        target=0.02,
        warm_bytes=256 << 10,
        sizes=(SIZES[0], SIZES[-1]),
        parallel_modes=(False,),
        socat_sizes=(SIZES[-1],),
        queue_args=("--quick", "--repeats", "1"),
        jsonl_messages=5_000,
        wire_sizes=(SIZES[0],),
    ),
}


class CaseError(Exception):
    """A run that could not be measured (a client or server failed, or a timeout)."""


# -- child processes spoken to by lines ---------------------------------------------------------


class Child:
    """A subprocess with line-based stdin/stdout; stderr goes to a log file."""

    def __init__(self, argv: Sequence[str], log: Path, name: str) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT
            )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.pending = b""
        self.eof = False

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise CaseError(f"{self.name} is gone ({self.tail_of_log()})") from exc

    def lines(self) -> list[str]:
        """The complete lines available now (non-blocking)."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                self.eof = True
                break
            self.pending += data
        *complete, self.pending = self.pending.split(b"\n")
        return [line.decode().strip() for line in complete]

    def read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            if b"\n" in self.pending:
                line, _, self.pending = self.pending.partition(b"\n")
                return line.decode().strip()
            if self.eof:
                raise CaseError(f"{self.name} exited ({self.tail_of_log()})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise CaseError(f"{self.name}: no answer within {timeout:.0f} s")
            select.select([self.fd], [], [], left)
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                self.eof = True
            self.pending += data

    def expect(self, word: str, timeout: float) -> list[str]:
        line = self.read_line(timeout)
        fields = line.split()
        if not fields or fields[0] != word:
            raise CaseError(f"{self.name}: expected {word!r}, got {line!r}")
        return fields

    def stop(self, command: str | None, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                if command:
                    self.send(command)
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except (CaseError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def tail_of_log(self) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(text[-3:]) if text else "no output"


def wait_lines(children: Iterable[Child], timeout: float) -> list[tuple[Child, str]]:
    """Lines from any of ``children`` within ``timeout`` (maybe none)."""
    children = list(children)
    found = [(child, line) for child in children for line in child.lines()]
    if found:
        return found
    live = [child.fd for child in children if not child.eof]
    if live and timeout > 0:
        select.select(live, [], [], timeout)
    return [(child, line) for child in children for line in child.lines()]


# -- one measured run ---------------------------------------------------------------------------


@dataclass
class Sample:
    count: int
    sent: int
    elapsed: float
    cpu: float
    status: str = "ok"
    client_seconds: float = 0.0
    rejected: int = 0
    client_cpu: float = 0.0
    """CPU seconds of every client process while it sent (summed)."""

    @property
    def ns_per_op(self) -> float | None:
        return self.elapsed / self.count * 1e9 if self.count and self.elapsed > 0 else None

    @property
    def cpu_ns_per_op(self) -> float | None:
        return self.cpu / self.count * 1e9 if self.count else None

    @property
    def client_cpu_ns_per_op(self) -> float | None:
        return self.client_cpu / self.count * 1e9 if self.count and self.client_cpu else None

    @property
    def loss(self) -> float:
        return 1 - self.count / self.sent if self.sent else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "sent": self.sent,
            "count": self.count,
            "elapsed_s": round(self.elapsed, 6),
            "ns_per_op": _round(self.ns_per_op),
            "cpu_ns_per_op": _round(self.cpu_ns_per_op),
            "loss": round(self.loss, 5),
            "client_s": round(self.client_seconds, 6),
            "client_cpu_ns_per_op": _round(self.client_cpu_ns_per_op),
            "rejected": self.rejected,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class Server:
    """One server process (``bench._servers``) for one (row, size, implementation)."""

    tune_allocator = True

    def __init__(
        self, row: Row, impl: str, size: int, work: Path, profile: Path | None = None
    ) -> None:
        self.row, self.impl, self.size = row, impl, size
        self.work = work
        self.sink_path: Path | None = None
        sink = "null"
        if row.sink == "file":
            self.sink_path = work / f"{row.key}-{impl}-{size}.jsonl"
            sink = f"file:{self.sink_path}"
        argv = [PYTHON, "-m", "bench._servers", impl, row.server, "--size", str(size)]
        self.name = f"{impl} {row.key} server"
        if self.tune_allocator:
            argv.append("--tune-allocator")
        if profile is not None:
            argv += ["--profile", str(profile)]
        self.child = Child(
            [*argv, "--sink", sink], work / f"{row.key}-{impl}-{size}.log", self.name
        )
        self.port = 0
        self.records = 0
        self.record_bytes = 0

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.port = int(self.child.expect("ready", timeout)[1])

    def after_run(self) -> None:
        """The file rows: count what was written, then empty the file for the next run."""
        if self.sink_path is not None and self.sink_path.exists():
            with self.sink_path.open("rb") as file:
                data = file.read()
            self.records += data.count(b"\n")
            self.record_bytes += len(data)
            os.truncate(self.sink_path, 0)

    def close(self) -> None:
        self.child.stop("quit")
        self.after_run()


def run_once(
    server: Server, count: int, connections: int, timeout: float, inflight: int = 1
) -> Sample:
    """Arm the server, start ``connections`` clients at once (each with ``inflight`` requests
    or calls in flight, for the unary transports), wait for the count-down."""
    row = server.row
    each = max(1, count // connections)
    total = each * connections
    clients = [
        Child(
            [
                PYTHON,
                "-m",
                "bench._clients",
                row.client,
                "--port",
                str(server.port),
                "--size",
                str(server.size),
                "--count",
                str(each),
                "--index",
                str(i),
                "--inflight",
                str(inflight),
            ],
            server.work / "clients.log",
            f"{row.client} client {i}",
        )
        for i in range(connections)
    ]
    try:
        for client in clients:
            client.expect("ready", 60)
        server.child.send(f"arm {total}")
        server.child.expect("armed", 10)
        started = time.monotonic()
        for client in clients:
            client.send("go")
        deadline = started + timeout
        sent: dict[Child, list[str]] = {}
        last_count, stable_since = -1, 0.0
        done: list[str] = []
        while True:
            now = time.monotonic()
            if now > deadline:
                server.child.send("report")
                fields = _expect_count(server.child)
                server.child.send("disarm")
                server.child.expect("disarmed", 10)
                return _sample(fields, total, started, sent, status="timeout")
            for child, line in wait_lines([server.child, *clients], min(0.05, deadline - now)):
                fields = line.split()
                if not fields:
                    continue
                if child is server.child and fields[0] == "done":
                    done = fields
                elif child is not server.child and fields[0] == "sent":
                    sent[child] = fields
                elif child is not server.child and fields[0] == "error":
                    raise CaseError(f"{child.name}: {line}")
            if done:
                # The clients that wait for answers report just after: their CPU is wanted.
                late = time.monotonic() + 10
                while len(sent) < len(clients) and time.monotonic() < late:
                    waiting = [c for c in clients if c not in sent and not c.eof]
                    if not waiting:
                        break
                    for child, line in wait_lines(waiting, 0.05):
                        fields = line.split()
                        if fields and fields[0] == "sent":
                            sent[child] = fields
                return _sample(done, total, started, sent)
            for client in clients:
                if client.eof and client not in sent:
                    raise CaseError(f"{client.name} exited ({client.tail_of_log()})")
            if row.lossy and len(sent) == len(clients):
                # Every datagram is out: done once the count has stopped moving.
                server.child.send("report")
                fields = _expect_count(server.child)
                now = time.monotonic()
                if int(fields[1]) != last_count:
                    last_count, stable_since = int(fields[1]), now
                elif now - stable_since >= SETTLE:
                    server.child.send("disarm")
                    server.child.expect("disarmed", 10)
                    return _sample(fields, total, started, sent)
                time.sleep(0.02)
    finally:
        for client in clients:
            client.stop("stop")


def _expect_count(child: Child) -> list[str]:
    # A "done" may cross our "report": either answers the question.
    while True:
        fields = child.read_line(10).split()
        if fields and fields[0] in ("count", "done"):
            return fields


def _sample(
    fields: list[str], total: int, started: float, sent: dict[Child, list[str]], status: str = "ok"
) -> Sample:
    count, t_last, cpu = int(fields[1]), float(fields[2]), float(fields[3])
    client_end = max((float(f[2]) for f in sent.values()), default=started)
    return Sample(
        count=count,
        sent=total,
        elapsed=max(t_last - started, 0.0),
        cpu=cpu,
        status=status if count else "failed",
        client_seconds=client_end - started,
        rejected=sum(int(f[3]) for f in sent.values()),
        client_cpu=sum(float(f[4]) for f in sent.values() if len(f) > 4),
    )


# -- socat: the C-speed reader ------------------------------------------------------------------

SOCAT_BLOCK = 256 * 1024


def run_socat(size: int, count: int, work: Path, timeout: float) -> Sample:
    """``socat -u TCP-LISTEN:0 OPEN:/dev/null``: elapsed = start signal to socat's exit."""
    argv = [
        "socat",
        "-d",
        "-d",
        "-u",
        "-b",
        str(SOCAT_BLOCK),
        "TCP-LISTEN:0,bind=127.0.0.1",
        "OPEN:/dev/null",
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 10
        while not (found := re.search(rb"listening on .*:(\d+)", proc.stderr.readline())):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise CaseError("socat did not start listening")
        port = int(found[1])
        client = Child(
            [
                PYTHON,
                "-m",
                "bench._clients",
                "tcp",
                "--port",
                str(port),
                "--size",
                str(size),
                "--count",
                str(count),
                "--then-close",
            ],
            work / "clients.log",
            "socat client",
        )
        try:
            client.expect("ready", 60)
            started = time.monotonic()
            client.send("go")
            os.set_blocking(proc.stderr.fileno(), False)
            while True:  # socat's stderr ends when it exits
                left = started + timeout - time.monotonic()
                if left <= 0:
                    raise CaseError("socat: timeout")
                select.select([proc.stderr.fileno()], [], [], left)
                try:
                    if not os.read(proc.stderr.fileno(), 65536):
                        break
                except BlockingIOError:
                    continue
            ended = time.monotonic()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            fields = client.expect("sent", 10)
        finally:
            client.stop(None)
    finally:
        if proc.returncode is None and proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return Sample(
        count=count,
        sent=count,
        elapsed=ended - started,
        cpu=usage.ru_utime + usage.ru_stime,
        client_seconds=float(fields[2]) - started,
    )


# -- a case: warm-up, calibration, repeats ------------------------------------------------------


@dataclass
class Result:
    row: str
    size: int
    parallel: bool
    connections: int
    impl: str
    inflight: int = 1
    count: int = 0
    samples: list[Sample] = field(default_factory=list)
    warmup: Sample | None = None
    status: str = "ok"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def good(self) -> list[Sample]:
        return [s for s in self.samples if s.status == "ok" and s.ns_per_op is not None]

    def median(self, attr: str = "ns_per_op") -> float | None:
        values = [getattr(s, attr) for s in self.good()]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def spread(self) -> float | None:
        values = [s.ns_per_op for s in self.good() if s.ns_per_op is not None]
        mid = self.median()
        if not values or not mid:
            return None
        return (max(values) - min(values)) / 2 / mid

    def as_dict(self) -> dict[str, Any]:
        losses = [s.loss for s in self.good()]
        return {
            "row": self.row,
            "size": self.size,
            "parallel": self.parallel,
            "connections": self.connections,
            "inflight": self.inflight,
            "impl": self.impl,
            "status": self.status
            if self.good()
            else (self.status if self.status != "ok" else "failed"),
            "note": self.note,
            "count": self.count,
            "median_ns_per_op": _round(self.median()),
            "median_cpu_ns_per_op": _round(self.median("cpu_ns_per_op")),
            "median_client_cpu_ns_per_op": _round(self.median("client_cpu_ns_per_op")),
            "spread": None if self.spread() is None else round(self.spread() or 0.0, 4),
            "median_loss": round(statistics.median(losses), 5) if losses else None,
            "warmup": self.warmup.as_dict() if self.warmup else None,
            "samples": [s.as_dict() for s in self.samples],
            **self.extra,
        }


UNARY_CLIENTS = ("http", "h2c", "grpc-unary", "grpc-make")


def warm_count(row: Row, size: int, mode: Mode) -> int:
    if row.client in UNARY_CLIENTS:
        return 200 if mode.name == "full" else 60
    if row.lossy:
        return max(100, min(20_000, mode.warm_bytes // 4 // size))
    return max(20, min(200_000, mode.warm_bytes // size))


def measured_count(
    row: Row, size: int, rate: float, mode: Mode, connections: int, inflight: int = 1
) -> int:
    count = int(rate * mode.target)
    low = 20 * inflight if row.client in UNARY_CLIENTS else 100
    # At most 1 GiB a run: at 79,435 B that is 13,500 messages, about 0.5 s for TCP.
    high = min(3_000_000, max(low, (1 << 30) // size))
    count = max(low * connections, min(high, count))
    return count - count % connections


def run_case(
    row: Row,
    size: int,
    parallel: bool,
    connections: int,
    servers: dict[str, Server],
    mode: Mode,
    log: Any,
    inflight: int = 1,
) -> list[Result]:
    """Warm up and calibrate every implementation, then run the repeats interleaved."""
    results = {
        impl: Result(row.key, size, parallel, connections, impl, inflight=inflight)
        for impl in servers
    }
    own: dict[str, int] = {}
    for impl, server in servers.items():
        result = results[impl]
        try:
            warm = run_once(
                server, warm_count(row, size, mode), connections, timeout=60, inflight=inflight
            )
        except CaseError as exc:
            result.status, result.note = "failed", str(exc)
            log(f"    {impl}: warm-up failed: {exc}")
            continue
        server.after_run()
        result.warmup = warm
        if warm.status != "ok" or not warm.ns_per_op:
            result.status, result.note = warm.status, f"warm-up: {warm.count}/{warm.sent} in 60 s"
            log(f"    {impl}: warm-up {warm.status} ({warm.count}/{warm.sent})")
            continue
        rate = 1e9 / warm.ns_per_op
        result.count = own[impl] = measured_count(row, size, rate, mode, connections, inflight)
    # Every implementation gets the same messages. A faster one sized by its own rate would
    # run longer, and, in the file rows, write more (its runs met the kernel's dirty-page
    # limits where the peer's did not). The count is the slowest one's, but at least half the
    # fastest one's: sized to the slowest alone, the UDP row's fast servers (beside plain
    # asyncio, 2 to 3x slower) and our WebSocket runs (7x) lasted 0.07 to 0.15 s, where the
    # noise of a shared machine is largest. A server more than 4x slower than that gets 4x
    # its own count instead (uvicorn + h11 answers a keep-alive request in about 44 ms here,
    # 400x slower than the fastest: half the fastest's count would take minutes a run).
    counts = [r.count for r in results.values() if r.status == "ok" and r.count]
    if counts:
        shared = max(min(counts), max(counts) // 2)
        for impl, result in results.items():
            if result.status == "ok":
                count = min(shared, 4 * own[impl])
                result.count = count - count % connections
    for _ in range(mode.repeats):
        for impl, server in servers.items():
            result = results[impl]
            if result.status != "ok":
                continue
            expected = (
                result.count / (1e9 / (result.warmup.ns_per_op or 1e9)) if result.warmup else 1
            )
            try:
                sample = run_once(
                    server,
                    result.count,
                    connections,
                    timeout=max(15.0, 20 * expected),
                    inflight=inflight,
                )
            except CaseError as exc:
                result.status, result.note = "failed", str(exc)
                log(f"    {impl}: {exc}")
                continue
            server.after_run()
            result.samples.append(sample)
            if sample.status != "ok":
                result.note = f"{sample.status}: {sample.count}/{sample.sent}"
    for impl, result in results.items():
        mid = result.median()
        loss = (
            f", loss {statistics.median(s.loss for s in result.good()):.1%}"
            if row.lossy and result.good()
            else ""
        )
        text = f"{mid:,.0f} ns/op" if mid else result.status
        log(f"    {impl:>12}: {text} (n={result.count}){loss}")
    return list(results.values())


NEEDS = {
    "uvloop": ("uvloop",),
    "grpcio": ("grpc",),
    "uvicorn-httptools": ("uvicorn", "httptools", "uvloop"),
    "uvicorn-h11": ("uvicorn",),
}
"""The modules each peer needs (all in the bench extra)."""


def missing(impl: str) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    for module in NEEDS.get(impl, ()):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (it is in the bench extra: pip install -e .[bench])"
    return None


def cases(row: Row, mode: Mode, parallel_n: int) -> list[tuple[bool, int, int]]:
    """``(parallel, connections, inflight)`` of each case of ``row`` in ``mode``."""
    if row.wire:
        inflights = row.inflight if True in mode.parallel_modes else row.inflight[:1]
        return [(n > 1, 1, n) for n in inflights]
    parallel_modes = mode.file_parallel if row.sink == "file" else mode.parallel_modes
    return [(parallel, parallel_n if parallel else 1, 1) for parallel in parallel_modes]


def run_row(row: Row, mode: Mode, parallel_n: int, work: Path, log: Any) -> list[Result]:
    results: list[Result] = []
    row_cases = cases(row, mode, parallel_n)
    impls = [impl for impl in row.impls if not missing(impl)]
    sizes = mode.wire_sizes if row.wire else mode.sizes

    def unmeasured(size: int, impls: Sequence[str], status: str, note: str) -> None:
        """Record the cells of ``size`` not yet in ``results`` as ``status`` (not measured)."""
        done = {(r.parallel, r.impl) for r in results if r.size == size and r.row == row.key}
        for parallel, connections, inflight in row_cases:
            for impl in impls:
                if (parallel, impl) not in done:
                    results.append(
                        Result(
                            row.key,
                            size,
                            parallel,
                            connections,
                            impl,
                            inflight=inflight,
                            status=status,
                            note=note,
                        )
                    )

    for impl in row.impls:
        if why := missing(impl):
            log(f"  {impl}: skipped: {why}")
            for size in sizes:
                unmeasured(size, [impl], "skipped", why)
    for size in sizes:
        if row.lossy and size > MAX_UDP:
            unmeasured(size, impls, "n/a", f"a UDP datagram holds at most {MAX_UDP} bytes")
            continue
        servers: dict[str, Server] = {}
        try:
            for impl in impls:
                servers[impl] = Server(row, impl, size, work)
            for server in servers.values():
                server.wait_ready()
            for parallel, connections, inflight in row_cases:
                shape = f"{inflight} in flight" if row.wire else f"{connections} connection(s)"
                log(f"  {row.title}, {size} B, {shape}")
                results += run_case(
                    row, size, parallel, connections, servers, mode, log, inflight=inflight
                )
        except CaseError as exc:
            log(f"  {row.title}, {size} B: {exc}")
            unmeasured(size, impls, "failed", str(exc))
        finally:
            for server in servers.values():
                server.close()
            if row.sink == "file":
                for result in results:
                    server = servers.get(result.impl)
                    if result.size == size and server is not None and server.records:
                        result.extra["file_bytes_per_record"] = round(
                            server.record_bytes / server.records, 1
                        )
    return results


def run_socat_row(mode: Mode, work: Path, log: Any, tcp: list[Result]) -> list[Result]:
    """socat at the sizes asked, interleaved repeat by repeat with a fresh trio_gateway TCP
    server given the same bytes, so that both sides of the ratio meet the same load.

    The paired runs of ours are stored with socat's result (``extra["paired"]``), apart from
    the TCP row's own figures, and the ratio is taken between the two.
    """
    row = next(row for row in ROWS if row.key == "tcp")
    results = []
    for size in mode.socat_sizes:
        result = Result("tcp", size, False, 1, "socat")
        paired = Result("tcp", size, False, 1, "trio_gateway")
        ours = next(
            (r for r in tcp if r.size == size and not r.parallel and r.impl == "trio_gateway"), None
        )
        result.count = paired.count = (
            ours.count if ours and ours.count else max(100, (mode.warm_bytes * 4) // size)
        )
        server: Server | None = None
        try:
            server = Server(row, "trio_gateway", size, work)
            server.wait_ready()
            warm = max(10, result.count // 4)
            paired.warmup = run_once(server, warm, 1, timeout=60)
            result.warmup = run_socat(size, warm, work, timeout=60)
            for _ in range(mode.repeats):
                sample = run_once(server, paired.count, 1, timeout=60)
                server.after_run()
                if sample.status == "ok":
                    paired.samples.append(sample)
                result.samples.append(run_socat(size, result.count, work, timeout=60))
        except CaseError as exc:
            result.status, result.note = "failed", str(exc)
        finally:
            if server is not None:
                server.close()
        result.extra["paired"] = {
            "impl": "trio_gateway",
            "median_ns_per_op": _round(paired.median()),
            "median_cpu_ns_per_op": _round(paired.median("cpu_ns_per_op")),
            "spread": None if paired.spread() is None else round(paired.spread() or 0.0, 4),
            "samples": [s.as_dict() for s in paired.samples],
        }
        mid, ours_mid = result.median(), paired.median()
        text = f"{mid:,.0f} ns/op" if mid else result.status
        if mid and ours_mid:
            text += f", trio_gateway beside it {ours_mid:,.0f} ns/op ({mid / ours_mid:.2f}x)"
        log(f"  socat, {size} B: {text}")
        results.append(result)
    return results


# -- queues and the JSON Lines encoder (in their own processes) ---------------------------------


def _run_tool(module: str, args: Sequence[str], work: Path) -> dict[str, Any]:
    """``python -m MODULE --json FILE ARGS`` in its own process: its JSON, with a status."""
    out = work / f"{module.rpartition('.')[2]}.json"
    done = subprocess.run(
        [PYTHON, "-m", module, "--json", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not out.exists():
        return {"status": "failed", "note": done.stderr[-500:]}
    document: dict[str, Any] = json.loads(out.read_text())
    document["status"] = "ok"
    return document


def run_queues(mode: Mode, work: Path) -> dict[str, Any]:
    return _run_tool("bench.queues", mode.queue_args, work)


def run_jsonl(mode: Mode, work: Path) -> dict[str, Any]:
    return _run_tool("bench.jsonl", ("--messages", str(mode.jsonl_messages)), work)


# -- the machine --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    from importlib import metadata

    names = ("trio", "h11", "h2", "websockets", "hypercorn", "grpclib", "protobuf", "uvloop")
    for name in (*names, "grpcio", "uvicorn", "httptools"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    socat = shutil.which("socat")
    if socat:
        first = subprocess.run([socat, "-V"], capture_output=True, text=True).stdout
        found = re.search(r"socat version ([\w.]+)", first)
        versions["socat"] = found[1] if found else "present"
    else:
        versions["socat"] = "absent"
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
    }


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="every case, short runs (< 2 min)")
    speed.add_argument(
        "--smoke", action="store_true", help="two sizes, no parallel runs: checks the pipeline"
    )
    parser.add_argument("--repeats", type=int, help="measured runs per case (default 5; quick 1)")
    parser.add_argument(
        "--parallel", type=int, default=os.cpu_count() or 2, help="connections when parallel"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="root for docs/ and bench/results/ (default: the repository "
        "for a full run, build/bench-MODE/ otherwise)",
    )
    parser.add_argument("--only", nargs="+", choices=ROW_KEYS, help="run these rows only")
    parser.add_argument("--no-queues", action="store_true", help="skip the queue table")
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="run every server with glibc's default malloc settings (by default every server, "
        "ours and the peers, gets the settings serve applies: trio_gateway.tuning.tune_allocator)",
    )
    args = parser.parse_args(argv)
    Server.tune_allocator = not args.glibc_defaults

    mode = MODES["quick" if args.quick else "smoke" if args.smoke else "full"]
    if args.repeats:
        mode = Mode(**{**mode.__dict__, "repeats": args.repeats})
    out: Path = args.out or (ROOT if mode.name == "full" else ROOT / "build" / f"bench-{mode.name}")
    rows = [row for row in ROWS if not args.only or row.key in args.only]
    started = time.monotonic()
    date = datetime.now(UTC)
    loads: list[float] = [os.getloadavg()[0]]

    def log(text: str) -> None:
        loads.append(os.getloadavg()[0])
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    log(
        f"mode {mode.name}: {len(rows)} rows, sizes {mode.sizes}, repeats {mode.repeats}, "
        f"parallel = {args.parallel} connections; load {loads[0]:.2f}"
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="trio_gateway-bench-") as tmp:
        work = Path(tmp)
        for row in rows:
            log(row.title)
            row_results = run_row(row, mode, args.parallel, work, log)
            results += row_results
            if row.key == "tcp":
                if shutil.which("socat"):
                    results += run_socat_row(mode, work, log, row_results)
                else:
                    log("  socat not found: the C-speed reader column is skipped")
        queues = {"status": "skipped"} if args.no_queues else run_queues(mode, work)
        log("queues: " + queues["status"])
        jsonl = run_jsonl(mode, work)
        log("jsonl encoder: " + jsonl["status"])
    elapsed = time.monotonic() - started
    document = {
        "schema": SCHEMA,
        "date": date.isoformat(timespec="seconds"),
        "mode": mode.name,
        "machine": machine(),
        "settings": {
            "repeats": mode.repeats,
            "target_seconds": mode.target,
            "parallel_connections": args.parallel,
            "sizes": list(mode.sizes),
            "rows": [row.key for row in rows],
            "settle_seconds": SETTLE,
            "socat_block": SOCAT_BLOCK,
            "tuned_allocator": Server.tune_allocator,
        },
        "load": {
            "start": round(loads[0], 2),
            "min": round(min(loads), 2),
            "median": round(statistics.median(loads), 2),
            "max": round(max(loads), 2),
            "end": round(os.getloadavg()[0], 2),
        },
        "elapsed_s": round(elapsed, 1),
        "rows": [row.described() for row in rows],
        "results": [result.as_dict() for result in results],
        "queues": queues,
        "jsonl": jsonl,
    }
    from ._report import write_outputs

    written = write_outputs(document, out)
    for path in written:
        log(f"wrote {path}")
    log(f"done in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
