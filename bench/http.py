"""Requests/s for an 18-byte POST /ingest: keep-alive, 16 concurrent connections (wrk).

Every server runs in its own process and queues into the same kind of ring buffer through the
same :class:`IngestApp` rules; only the HTTP machinery differs:

* ``trio_gateway``       HttpSource as shipped (h11 driven directly on a Trio stream)
* ``gateway-hypercorn``  HttpSource with ``fast_path=False`` (every connection via hypercorn)
* ``hypercorn-trio``     ``hypercorn.trio.serve(IngestApp)``: hypercorn's Trio worker, stock
* ``hypercorn-asyncio``  ``hypercorn.asyncio.serve(IngestApp)``: the baseline to beat
* ``uvicorn-h11``        ``uvicorn`` with ``--http h11`` (only if uvicorn is installed)

Usage: ``python -m bench.http [--seconds 5] [--connections 16] [--json out.json]``.
Needs ``wrk`` (``apt-get install -y wrk``).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.http")

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BODY = "x" * 18
SERVERS = (
    "trio_gateway",
    "gateway-hypercorn",
    "hypercorn-trio",
    "hypercorn-asyncio",
    "uvicorn-h11",
)


def _ingress() -> Any:
    import trio

    from trio_gateway._ingress import Ingress
    from trio_gateway._ledger import SourceCounters
    from trio_gateway.queues import RingBuffer

    # drop_oldest: the ring never blocks, so no consumer task is needed (and no trio call is
    # made on the request path, which lets the asyncio servers use the very same app).
    queue = RingBuffer(1 << 20, policy="drop_oldest")
    return Ingress(queue, SourceCounters("http", "bench"), trio.Event(), grace_period=0.5)


def _app() -> Any:
    from trio_gateway.sources.http import IngestApp, IngestRules

    return IngestApp(IngestRules(_ingress()))


def serve(kind: str, port: int) -> None:
    """Run one server in this process until killed."""
    if kind in ("trio_gateway", "gateway-hypercorn"):
        import trio

        from trio_gateway.sources.http import HttpSource

        source = HttpSource(port=port, fast_path=kind == "trio_gateway")
        trio.run(source.run, _ingress())
    elif kind in ("hypercorn-trio", "hypercorn-asyncio"):
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        config.errorlog = None
        if kind == "hypercorn-trio":
            import trio
            from hypercorn.trio import serve as trio_serve

            trio.run(trio_serve, _app(), config)
        else:
            import asyncio

            from hypercorn.asyncio import serve as asyncio_serve

            asyncio.run(asyncio_serve(_app(), config))
    elif kind == "uvicorn-h11":
        import uvicorn

        uvicorn.run(
            _app(),
            host="127.0.0.1",
            port=port,
            http="h11",
            loop="asyncio",
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    else:
        raise SystemExit(f"unknown server {kind!r}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def measure(kind: str, seconds: int, connections: int, script: str) -> float | None:
    if kind == "uvicorn-h11":
        try:
            import uvicorn  # noqa: F401
        except ImportError:
            return None
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.http", "--serve", kind, str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port)
        url = f"http://127.0.0.1:{port}/ingest"
        subprocess.run(
            ["wrk", "-t1", "-c4", "-d1s", "-s", script, url], check=True, capture_output=True
        )  # warm-up
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script, url],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            raise RuntimeError(f"{kind}: {non2xx[1]} failed requests")
        return float(match[1]) if match else None
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"))
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", choices=SERVERS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(f'wrk.method = "POST"\nwrk.body = "{BODY}"\n')
    results: dict[str, float | None] = {}
    try:
        for kind in args.only or SERVERS:
            results[kind] = measure(kind, args.seconds, args.connections, lua.name)
    finally:
        os.unlink(lua.name)
    base = results.get("hypercorn-asyncio")
    print(
        f"\n18-byte POST, keep-alive, {args.connections} connections, wrk -t1, "
        f"{args.seconds} s, {os.cpu_count()} cores\n"
    )
    print("| server | requests/s | vs hypercorn-asyncio |")
    print("|---|---:|---:|")
    for kind, rate in results.items():
        if rate is None:
            print(f"| {kind} | n/a | |")
            continue
        ratio = f"{rate / base:.2f}x" if base else ""
        print(f"| {kind} | {rate:,.0f} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
