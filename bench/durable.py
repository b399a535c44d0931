"""What durability costs, and whether it holds: the disk queue's throughput per fsync policy,
beside the memory queue and the disk's own bandwidth; and ``kill -9`` restarts under load.

    python -m bench.durable [--quick] [--repeat N] [--restarts N] [--json FILE]
                            [--tcp-only] [--sizes 18 4266] [--modes memory batch ...]

**Throughput.** A gateway in this process (``TcpSource`` -> queue -> ``NullSink``, as ``serve
--sink null`` builds it) and a client process that writes a pre-built newline-framed stream
over one connection. The figure is messages / (time from connect until the pump has delivered
the last one). Rows: the ring buffer (memory), and the disk queue with ``fsync = batch``,
``interval`` and ``always``; for 18-byte and 4,266-byte messages; each row the best of
``--repeat`` runs, with the CPU seconds the gateway (this process: event loop and writer
thread) and the client used. Beside them, ``dd`` writing 256 MiB with ``conv=fdatasync`` into
the same directory, before and after those rows: the disk's sequential bandwidth, of which
each 4,266-byte row is given as a share (of the faster ``dd``). Then HTTP with
acknowledgements: ``serve --sink null`` and ``send --http --concurrency 64``, one message per
request, where every ``202`` of the disk queue waits for its commit; and ``ack = "queued"``
against ``"delivered"`` (file sink, ``fsync = true``) for HTTP, gRPC bidi and WebSocket acks.

**Kill -9.** ``serve --http`` with a file sink (:data:`KILL9_MODES`: the disk queue, or
``ack = "delivered"``), a client posting NDJSON batches of 100 and remembering each one
acknowledged with 202, and ``SIGKILL`` at a random moment, ``--restarts`` times (20 by
default); then one last start drains the queue. Reported:
messages acknowledged, found in the file, acknowledged but missing (must be 0), and copies
(at-least-once: a batch delivered but not yet settled when the process died comes again).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.durable")

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import trio

from trio_gateway import Gateway, NullSink, RingBuffer, TcpSource
from trio_gateway.queues import DiskQueue, Queue
from trio_gateway.sinks import decode_jsonl_record

ROOT = Path(__file__).resolve().parent.parent
MODES = ("memory", "batch", "interval", "always")
"""The memory queue (a ring), then the disk queue under each fsync policy."""

_CLIENT = """
import socket, sys
port, size, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
line = b"x" * (size - 1) + b"\\n"
chunk = line * max(1, (256 * 1024) // size)
per_chunk = len(chunk) // size
s = socket.create_connection(("127.0.0.1", port))
full, rest = divmod(count, per_chunk)
for _ in range(full):
    s.sendall(chunk)
s.sendall(line * rest)
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _throughput(queue: Queue[bytes], size: int, count: int) -> tuple[float, float, float]:
    """(msg/s, the gateway's CPU seconds, the client's) for ``count`` messages of ``size``."""
    sink = NullSink()
    gateway = Gateway(
        sources=[TcpSource(port=0, max_message_size=max(size, 1024))],
        sink=sink,
        queue=queue,
        batch_size=4096,
    )
    async with trio.open_nursery() as nursery:
        ((address,),) = await nursery.start(gateway.run)
        started = time.perf_counter()
        cpu = _own_cpu()
        client = await trio.lowlevel.open_process(
            [sys.executable, "-c", _CLIENT, str(address[1]), str(size), str(count)]
        )
        while sink.messages < count:
            await trio.sleep(0.005)
        seconds = time.perf_counter() - started
        cpu = _own_cpu() - cpu  # this process is the gateway (its event loop and the writer)
        client_cpu = _cpu_of(client.pid)  # it waits for the gateway to close: still there
        gateway.shutdown()
        await client.wait()
    return count / seconds, cpu, client_cpu


def _dd(directory: Path) -> float:
    """MB/s of ``dd`` writing 256 MiB with fdatasync into ``directory``."""
    target = directory / "dd.bin"
    result = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=256", "conv=fdatasync"],
        capture_output=True,
        text=True,
        check=True,
    )
    target.unlink()
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", result.stderr)
    assert match, result.stderr
    return int(match[1]) / float(match[2]) / 1e6


def throughput(
    quick: bool,
    repeat: int = 1,
    *,
    sizes: tuple[int, ...] = (18, 4266),
    modes: tuple[str, ...] = MODES,
    http: bool = True,
) -> dict[str, object]:
    """The TCP rows (best of ``repeat`` runs each: on a shared machine the best run is the
    one least disturbed) and the HTTP rows; ``dd`` before and after the TCP rows, and each
    4,266-byte row as a share of the faster ``dd``."""
    rows: dict[str, object] = {}
    load = [os.getloadavg()[0]]  # the machine is shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="trio_gateway-durable-") as tmp:
        base = Path(tmp)
        dd = [_dd(base)]
        counts = {18: 600_000 if quick else 3_000_000, 4266: 20_000 if quick else 100_000}
        for size in sizes:
            n = counts[size]
            for mode in modes:
                best: tuple[float, float, float, object] | None = None
                for attempt in range(repeat):
                    directory = base / f"{mode}-{size}-{attempt}"
                    if mode == "memory":
                        queue: Queue[bytes] = RingBuffer(10_000)
                    else:
                        queue = DiskQueue(directory, fsync=mode, max_bytes=4 << 30)
                    rate, cpu, client_cpu = trio.run(_throughput, queue, size, n)
                    if best is None or rate > best[0]:
                        best = (rate, cpu, client_cpu, getattr(queue, "commits", None))
                    shutil.rmtree(directory, ignore_errors=True)
                assert best is not None
                rate, cpu, client_cpu, commits = best
                rows[f"{size}B {mode}"] = {
                    "msg_per_s": round(rate),
                    "MBps": round(rate * size / 1e6, 1),
                    "commits": commits,
                    "gateway_cpu_s": round(cpu, 2),
                    "client_cpu_s": round(client_cpu, 2),
                    "gateway_us_per_msg": round(cpu / n * 1e6, 2),
                }
                print(
                    f"{size:>5} B  {mode:<8} {rate:>12,.0f} msg/s {rate * size / 1e6:>8.1f} MB/s"
                    f"  CPU: gateway {cpu:.2f} s, client {client_cpu:.2f} s"
                )
        dd.append(_dd(base))
        rows["dd_MBps"] = [round(x, 1) for x in dd]
        shares = [mode for mode in modes if 4266 in sizes]
        for mode in shares:
            row = rows[f"4266B {mode}"]
            assert isinstance(row, dict)
            row["share_of_dd"] = round(row["MBps"] / max(dd), 3)
        for mode in modes if http else ():
            rate = _http(base / f"http-{mode}", mode, 5_000 if quick else 20_000)
            rows[f"http {mode}"] = {"msg_per_s": round(rate)}
            print(f"HTTP, 64 clients, {mode:<8} {rate:>8,.0f} msg/s")
    load.append(os.getloadavg()[0])
    rows["load_average"] = load
    print(f"dd (conv=fdatasync, 256 MiB), before and after: {dd[0]:,.0f} / {dd[1]:,.0f} MB/s")
    for mode in shares:
        row = rows[f"4266B {mode}"]
        assert isinstance(row, dict)
        print(f"4,266 B {mode:<8} {row['share_of_dd']:.0%} of the faster dd")
    print(f"load average (1 min), before and after: {load[0]:.2f} / {load[1]:.2f}")
    return rows


def _http(directory: Path, mode: str, count: int) -> float:
    """msg/s of ``send --http --concurrency 64``, one message per request, against ``serve``
    with the queue ``mode`` (each 202 waits for its commit with the disk queue)."""
    queue = [] if mode == "memory" else ["--queue", f"disk:{directory}", "--queue-fsync", mode]
    gateway = _Serve(["--http", "127.0.0.1:0", "--sink", "null", *queue])
    try:
        url = f"http://127.0.0.1:{gateway.port}/ingest"
        command = [sys.executable, "-m", "trio_gateway", "send", "--http", url]
        result = subprocess.run(
            [*command, "--count", str(count), "--concurrency", "64"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
    finally:
        gateway.proc.send_signal(signal.SIGTERM)
        gateway.proc.wait()
    match = re.search(r"([\d,]+) msg/s", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match[1].replace(",", ""))


# -- kill -9 ------------------------------------------------------------------------------


class _Serve:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trio_gateway", "serve", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
        assert self.proc.stderr is not None
        self.port = 0
        self.ports: dict[str, int] = {}
        self.stderr: list[str] = []
        while True:
            line = self.proc.stderr.readline().decode()
            if not line:
                raise RuntimeError("serve exited: " + "".join(self.stderr))
            self.stderr.append(line)
            match = re.search(r"listening: (\w+) on .*:(\d+)$", line.strip())
            if match:
                self.ports.setdefault(match[1], int(match[2]))
                self.port = self.ports.get("http", 0)
            if line.rstrip().endswith(": ready"):
                break
        # Keep reading stderr so the pipe never fills.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.decode())


def _client(port: int, acknowledged: list[bytes], stop: threading.Event, start: int) -> None:
    n = start
    url = f"http://127.0.0.1:{port}/ingest"
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            lines = [b'{"n":%d}' % (n + i) for i in range(100)]
            try:
                response = client.post(
                    url, content=b"\n".join(lines), headers={"Content-Type": "application/x-ndjson"}
                )
            except httpx.HTTPError:
                return  # killed: this batch was not acknowledged
            if response.status_code == 202:
                acknowledged += lines
            n += 100


KILL9_MODES = ("disk batch", "disk interval", "memory delivered", "memory queued")
"""The disk queue under two fsync policies (ack = queued); the memory queue with
ack = delivered and a file sink that fsyncs each batch; and, for contrast, the memory queue
with ack = queued (what a crash cost before: acknowledged messages are lost)."""


def kill9(restarts: int, mode: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="trio_gateway-durable-") as tmp:
        base = Path(tmp)
        out = base / "out.jsonl"
        queue, how = mode.split()
        args = ["--http", "127.0.0.1:0"]
        if queue == "disk":
            args += ["--queue", f"disk:{base / 'q'}", "--queue-fsync", how]
            args += ["--sink", f"file:{out}"]
        else:
            config = base / "gateway.toml"
            config.write_text(f'[sink]\nurl = "file:{out}"\nfsync = true\n')
            args += ["--config", str(config), "--ack", how]
        acknowledged: list[bytes] = []
        started = time.perf_counter()
        for restart in range(restarts):
            gateway = _Serve(args)
            stop = threading.Event()
            client = threading.Thread(
                target=_client, args=(gateway.port, acknowledged, stop, restart * 10_000_000)
            )
            client.start()
            time.sleep(random.uniform(0.3, 1.0))
            gateway.proc.send_signal(signal.SIGKILL)
            gateway.proc.wait()
            stop.set()
            client.join()
        seconds = time.perf_counter() - started
        last = _Serve(args)
        deadline = time.monotonic() + 60
        wanted = set(acknowledged)
        while time.monotonic() < deadline:
            with out.open("rb") as file:
                found = Counter(decode_jsonl_record(line)[0] for line in file)
            if wanted <= found.keys():
                break
            time.sleep(0.2)
        last.proc.send_signal(signal.SIGTERM)
        last.proc.wait()
        missing = len(wanted - found.keys())
        copies = sum(c - 1 for c in found.values() if c > 1)
    result = {
        "mode": mode,
        "restarts": restarts,
        "acknowledged": len(acknowledged),
        "in_file": sum(found.values()),
        "lost_acknowledged": missing,
        "copies": copies,
        "acknowledged_per_s": round(len(acknowledged) / seconds),
    }
    print(json.dumps(result))
    return result


def _send(gateway: _Serve, transport: str, extra: list[str], count: int) -> float:
    """msg/s of ``send`` with 64 concurrent clients against ``gateway``."""
    address = {
        "http": f"http://127.0.0.1:{gateway.ports['http']}/ingest",
        "grpc": f"127.0.0.1:{gateway.ports['grpc']}",
        "ws": f"ws://127.0.0.1:{gateway.ports['websocket']}/",
    }[transport]
    command = [sys.executable, "-m", "trio_gateway", "send", f"--{transport}", address]
    result = subprocess.run(
        [*command, *extra, "--count", str(count), "--concurrency", "64"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    match = re.search(r"([\d,]+) msg/s", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match[1].replace(",", ""))


ACK_COUNTS = {"http": (5_000, 20_000), "grpc": (30_000, 200_000), "ws": (30_000, 200_000)}
"""Messages per run (quick, full): a stream of 20,000 took 0.2-0.4 s over WebSocket, less
than the noise of a shared machine; ``send --http`` tops out near 1,000-2,000 requests/s."""


def acks(quick: bool, repeat: int = 2) -> dict[str, object]:
    """``ack = "queued"`` against ``"delivered"``, the file sink fsyncing each batch: the
    modes alternate ``repeat`` times and each keeps its best run (the least disturbed)."""
    rows: dict[str, object] = {}
    cases: tuple[tuple[str, list[str]], ...] = (
        ("http", []),
        ("grpc", ["--mode", "bidi"]),
        ("ws", ["--acks"]),
    )
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="trio_gateway-durable-") as tmp:
        config = Path(tmp) / "gateway.toml"
        config.write_text(f'[sink]\nurl = "file:{Path(tmp) / "out.jsonl"}"\nfsync = true\n')
        listeners = ["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--ws", "127.0.0.1:0"]
        for _ in range(repeat):
            for ack in ("queued", "delivered"):
                gateway = _Serve(["--config", str(config), "--ack", ack, *listeners])
                try:
                    for transport, extra in cases:
                        count = ACK_COUNTS[transport][0 if quick else 1]
                        rate = _send(gateway, transport, extra, count)
                        key = f"{transport} {ack}"
                        best[key] = max(best.get(key, 0.0), rate)
                        print(f"{transport:<5} ack={ack:<10} {rate:>8,.0f} msg/s (64 clients)")
                finally:
                    gateway.proc.send_signal(signal.SIGTERM)
                    gateway.proc.wait()
    rows.update((key, round(rate)) for key, rate in best.items())
    for transport, _ in cases:
        queued, delivered = best[f"{transport} queued"], best[f"{transport} delivered"]
        rows[f"{transport} ratio"] = round(delivered / queued, 2)
        print(f"{transport:<5} delivered / queued (best of {repeat}): {delivered / queued:.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durable", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer messages")
    parser.add_argument("--restarts", type=int, default=20, help="kill -9 restarts (20)")
    parser.add_argument("--no-throughput", action="store_true", help="only the kill -9 part")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per throughput row, best kept (2)"
    )
    parser.add_argument(
        "--tcp-only", action="store_true", help="only the TCP throughput rows and dd"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        choices=(18, 4266),
        default=[18, 4266],
        help="message sizes of the TCP rows (18 4266)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="queues of the TCP and HTTP rows (all: memory batch interval always)",
    )
    args = parser.parse_args(argv)
    results: dict[str, object] = {}
    if not args.no_throughput:
        results["throughput"] = throughput(
            args.quick,
            args.repeat,
            sizes=tuple(args.sizes),
            modes=tuple(args.modes),
            http=not args.tcp_only,
        )
        if not args.tcp_only:
            results["acks"] = acks(args.quick, args.repeat)
    if args.tcp_only:
        args.restarts = 0
    if args.restarts:
        results["kill9"] = [kill9(args.restarts, mode) for mode in KILL9_MODES]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
