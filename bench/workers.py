"""Worker processes: messages/s through one TCP port with 1 and 2 workers, several connections.

    python -m bench.workers [--quick] [--repeats N] [--connections C] [--json FILE]

The server is ``python -m trio_gateway serve --workers W --tcp 127.0.0.1:0 --sink null``
(W = 1 is the ordinary single process; W = 2 is the supervisor and two workers sharing the port
with SO_REUSEPORT). The client is a separate process with one thread per connection: it opens
C connections, then each writes its pre-built stream of newline-framed messages in one
``sendall``, shuts down its side and waits for the gateway to close the connection, which it
does once it has read and queued every message. The figure is messages / (time from the first
byte to the last close). Each worker's share comes from the ledgers the workers log at
shutdown (the kernel hashes each connection's addresses to pick a worker, so C connections
split unevenly: with 8 connections on 2 workers, 4/4 only about a quarter of the time).

On a 2-core machine the client's threads and the kernel's loopback work compete with the
workers for the same two cores: quote what you see with that in mind (see docs/workers.md).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.workers")

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ._payloads import payload

ROOT = Path(__file__).resolve().parent.parent

# -- the client (run as `python -m bench.workers --client PORT SIZE COUNT CONNECTIONS`) --------


def build_stream(size: int, count: int) -> bytes:
    # A few distinct documents repeated: building millions of unique ones would time the client.
    distinct = [payload(size, seq) for seq in range(min(count, 1024))]
    body = b"\n".join(distinct) + b"\n"
    reps, extra = divmod(count, len(distinct))
    return body * reps + b"".join(p + b"\n" for p in distinct[:extra])


def client(port: int, size: int, count: int, connections: int) -> None:
    """Send ``count`` messages over each of ``connections`` connections; print the seconds."""
    stream = build_stream(size, count)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    start = threading.Barrier(connections + 1)
    errors: list[BaseException] = []

    def one(sock: socket.socket) -> None:
        try:
            start.wait()
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except BaseException as exc:
            errors.append(exc)
        finally:
            sock.close()

    threads = [threading.Thread(target=one, args=(s,)) for s in socks]
    for thread in threads:
        thread.start()
    start.wait()
    began, cpu_began = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu_began  # the client's own CPU (kernel send path included)
    if errors:
        raise SystemExit(f"client failed: {errors[0]!r}")
    print(json.dumps({"seconds": elapsed, "cpu": cpu}), flush=True)


# -- the server -----------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def start_server(workers: int) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    argv = [
        sys.executable,
        "-m",
        "trio_gateway",
        "serve",
        "--workers",
        str(workers),
        "--tcp",
        "127.0.0.1:0",
        "--sink",
        "null",
        "--capacity",
        "65536",
        "--batch-size",
        "4096",
        "--admin",
        "off",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stderr is not None
    port = 0
    pids = [proc.pid]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode()
        if not line:
            raise RuntimeError("server exited")
        match = re.search(r"listening: tcp on .*:(\d+)", line)
        if match:
            port = int(match[1])
        match = re.search(r"worker \d+ started: pid (\d+)", line)
        if match:
            pids.append(int(match[1]))
        if line.rstrip().endswith(": ready") and port:
            return proc, port, pids
    raise TimeoutError("server did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> tuple[list[int], int]:
    """SIGTERM; return each worker's received count (from its ledger) and the total."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    text = err.decode(errors="replace")
    shares = [json.loads(m)["received"] for m in re.findall(r"worker \d+ ledger: (\{.*\})", text)]
    ledgers = [ln for ln in text.splitlines() if ln.startswith('{"ledger"')]
    total = json.loads(ledgers[-1])["ledger"]["received"] if ledgers else -1
    return shares, total


def measure(workers: int, size: int, count: int, connections: int) -> dict[str, Any]:
    proc, port, pids = start_server(workers)
    cpu_before = cpu_seconds(pids)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench.workers", "--client", str(port), str(size),
             str(count), str(connections)],
            capture_output=True, text=True, timeout=600, check=True, cwd=ROOT,
        )  # fmt: skip
        server_cpu = cpu_seconds(pids) - cpu_before
    finally:
        shares, total = stop_server(proc)
    timing = json.loads(result.stdout)
    messages = count * connections
    if total != messages:
        raise RuntimeError(f"the gateway received {total} of {messages} messages")
    return {
        "seconds": timing["seconds"],
        "rate": messages / timing["seconds"],
        "client_cpu": timing["cpu"] / timing["seconds"],
        "server_cores": server_cpu / timing["seconds"],
        "shares": shares or [messages],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small run, 18-byte messages only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--client",
        nargs=4,
        type=int,
        metavar=("PORT", "SIZE", "COUNT", "C"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.client:
        client(*args.client)
        return

    # messages per connection, by size: each run moves roughly the same number of bytes.
    plan = {18: 1_000_000, 512: 100_000} if not args.quick else {18: 250_000}
    repeats = 1 if args.quick else args.repeats
    rows = []
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{args.connections} connections, {repeats} repeat(s), median shown; "
        f"{os.cpu_count()} cores, load average {load} before the run",
        flush=True,
    )
    print(
        "| size | workers | msg/s | MB/s | client CPU | per-worker messages | speed-up "
        "| bound by the split | server cores busy |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for size, count in plan.items():
        results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(repeats):
            for workers in (1, 2):  # alternate, so machine drift hits both alike
                results[workers].append(measure(workers, size, count, args.connections))
        base = statistics.median(r["rate"] for r in results[1])
        for workers in (1, 2):
            runs = results[workers]
            rate = statistics.median(r["rate"] for r in runs)
            client_cpu = statistics.median(r["client_cpu"] for r in runs)
            cores = statistics.median(r["server_cores"] for r in runs)
            # With perfect scaling, the busier worker sets the time: total / its share.
            bound = statistics.median(sum(r["shares"]) / max(r["shares"]) for r in runs)
            shares = ", ".join("/".join(map(str, r["shares"])) for r in runs)
            row = {
                "size": size,
                "workers": workers,
                "connections": args.connections,
                "rate": rate,
                "mb_per_s": rate * size / 1e6,
                "runs": runs,
                "speedup": rate / base,
                "split_bound": bound,
            }
            rows.append(row)
            print(
                f"| {size} | {workers} | {rate:,.0f} | {rate * size / 1e6:.1f} | "
                f"{client_cpu:.0%} of a core | {shares} | "
                f"{rate / base:.2f}x | {bound:.2f}x | {cores:.2f} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
