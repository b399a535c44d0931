"""gRPC throughput: our h2 server on Trio against grpclib's asyncio server, same handler.

    python -m bench.grpc [--quick] [--repeats N] [--json FILE]

Servers (each a fresh process per repeat):

- trio: ``trio_gateway.sources.grpc.GrpcServer`` running :class:`BenchGateway`.
- asyncio: ``grpclib.server.Server`` running the very same :class:`BenchGateway` class.
- gateway: the product path, ``GrpcSource`` + ring buffer + null sink inside a ``Gateway``
  (its own services: offer to the queue, batch per read), for reference.

Client: grpclib's asyncio client in another process. Unary: 32 concurrent callers on one
channel. Streaming: one client-streaming call; the client writes pre-encoded gRPC messages in
64 KiB DATA writes through grpclib's HTTP/2 stream, so that the client is not the bottleneck.
Figures: messages (calls) per second, wall clock from the first request to the final reply,
and the server process's CPU time per message (from /proc). Ratios are trio / asyncio, from
the same run. On a shared 2-core machine, quote ratios, not absolutes.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.grpc")

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trio_gateway._proto import gateway_pb2
from trio_gateway._proto.gateway_grpc import GatewayBase, GatewayStub

from ._payloads import payload

ROOT = Path(__file__).resolve().parent.parent

SIZES = (18, 4266)
CONCURRENCY = 32
_TICK = os.sysconf("SC_CLK_TCK")


class BenchGateway(GatewayBase):  # type: ignore[misc]
    """One handler, written against grpclib's Stream API, run by both servers."""

    def __init__(self) -> None:
        self.received = 0

    async def Send(self, stream: Any) -> None:
        message = await stream.recv_message()
        self.received += 1
        await stream.send_message(
            gateway_pb2.Ack(sequence=message.sequence, accepted=True, accepted_count=1)
        )

    async def Stream(self, stream: Any) -> None:
        count = 0
        async for _ in stream:
            count += 1
        self.received += count
        await stream.send_message(gateway_pb2.Ack(accepted=True, accepted_count=count))

    async def StreamAcked(self, stream: Any) -> None:
        async for message in stream:
            await stream.send_message(gateway_pb2.Ack(sequence=message.sequence, accepted=True))


# -- servers (python -m bench.grpc --serve KIND) ---------------------------------------------


def serve_trio() -> None:
    import trio

    from trio_gateway.sources.grpc import GrpcServer

    async def main() -> None:
        never = trio.Event()
        server = GrpcServer([BenchGateway()], wait_stopping=never.wait)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)

        async def handle(stream: trio.SocketStream) -> None:
            await server.serve_connection(stream, "")

        await trio.serve_listeners(handle, listeners)

    trio.run(main)


def serve_asyncio() -> None:
    from grpclib.server import Server

    async def main() -> None:
        server = Server([BenchGateway()])
        await server.start("127.0.0.1", 0)
        sockets = server._server.sockets if server._server else []  # grpclib exposes no port
        print(sockets[0].getsockname()[1], flush=True)
        await server.wait_closed()

    asyncio.run(main())


def serve_gateway() -> None:
    import trio

    from trio_gateway._gateway import Gateway
    from trio_gateway.queues import RingBuffer
    from trio_gateway.sinks import NullSink
    from trio_gateway.sources.grpc import GrpcSource

    async def main() -> None:
        source = GrpcSource(max_message_size=8 << 20)
        gateway = Gateway(sources=[source], sink=NullSink(), queue=RingBuffer(100_000))
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            print(address[1], flush=True)

    trio.run(main)


# -- the client (python -m bench.grpc --client unary|stream PORT SIZE COUNT) ------------------


async def client_unary(port: int, size: int, count: int) -> dict[str, float]:
    from grpclib.client import Channel

    messages = [gateway_pb2.Message(payload=payload(size, i), sequence=i) for i in range(count)]
    async with Channel("127.0.0.1", port) as channel:
        stub = GatewayStub(channel)
        await stub.Send(messages[0])  # connect and warm up
        next_index = 0

        async def caller() -> None:
            nonlocal next_index
            while next_index < count:
                message = messages[next_index]
                next_index += 1
                await stub.Send(message)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
    return {"count": count, "seconds": elapsed}


async def client_stream(port: int, size: int, count: int) -> dict[str, float]:
    from grpclib.client import Channel

    frames = [
        gateway_pb2.Message(payload=payload(size, i), sequence=i).SerializeToString()
        for i in range(count)
    ]
    chunks: list[bytes] = []
    current: list[bytes] = []
    current_size = 0
    for body in frames:
        current.append(b"\x00" + len(body).to_bytes(4, "big") + body)
        current_size += len(body) + 5
        if current_size >= 64 * 1024:
            chunks.append(b"".join(current))
            current, current_size = [], 0
    if current:
        chunks.append(b"".join(current))
    async with Channel("127.0.0.1", port) as channel:
        stub = GatewayStub(channel)
        await stub.Send(gateway_pb2.Message(payload=b"warm-up"))
        start = time.perf_counter()
        async with stub.Stream.open() as stream:
            await stream.send_request()
            # pre-encoded messages straight onto grpclib's HTTP/2 stream (flow-controlled)
            for i, chunk in enumerate(chunks):
                await stream._stream.send_data(chunk, end_stream=i == len(chunks) - 1)
            stream._end_done = True
            ack = await stream.recv_message()
        elapsed = time.perf_counter() - start
    assert ack is not None and ack.accepted_count == count, ack
    return {"count": count, "seconds": elapsed}


# -- the driver -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def start_server(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc", "--serve", kind], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{kind} server did not start")
    return proc, int(line)


def run_client(scenario: str, port: int, size: int, count: int) -> dict[str, float]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.grpc",
            "--client",
            scenario,
            str(port),
            str(size),
            str(count),
        ],
        capture_output=True,
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def measure(kind: str, scenarios: list[tuple[str, int, int]]) -> dict[str, dict[str, float]]:
    proc, port = start_server(kind)
    results = {}
    try:
        for scenario, size, count in scenarios:
            before = cpu_seconds(proc.pid)
            result = run_client(scenario, port, size, count)
            cpu = cpu_seconds(proc.pid) - before
            results[f"{scenario}/{size}"] = {
                "per_second": result["count"] / result["seconds"],
                "server_cpu_us": cpu / result["count"] * 1e6,
            }
    finally:
        proc.terminate()
        proc.wait(10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve", choices=("trio", "asyncio", "gateway"), help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        {"trio": serve_trio, "asyncio": serve_asyncio, "gateway": serve_gateway}[args.serve]()
        return
    if args.client:
        scenario, port, size, count = args.client
        client = client_unary if scenario == "unary" else client_stream
        print(json.dumps(asyncio.run(client(int(port), int(size), int(count)))))
        return

    scale = 4 if args.quick else 1
    repeats = 1 if args.quick else args.repeats
    scenarios = [("unary", size, 8000 // scale) for size in SIZES]
    scenarios += [("stream", 18, 400_000 // scale), ("stream", 4266, 40_000 // scale)]
    kinds = ("trio", "asyncio", "gateway")
    runs: dict[str, list[dict[str, dict[str, float]]]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind in kinds:  # interleaved, so machine drift hits all servers alike
            runs[kind].append(measure(kind, scenarios))

    def median(kind: str, key: str, field: str) -> float:
        return statistics.median(run[key][field] for run in runs[kind])

    rows = []
    print(f"gRPC, grpclib client in another process, median of {repeats} run(s)\n")
    header = (
        "| scenario | size (B) | trio msg/s | asyncio msg/s | ratio | "
        "trio CPU us/msg | asyncio CPU us/msg | CPU ratio | gateway path msg/s |"
    )
    print(header)
    print("|" + "---|" * 9)
    for scenario, size, _ in scenarios:
        key = f"{scenario}/{size}"
        ours, theirs = median("trio", key, "per_second"), median("asyncio", key, "per_second")
        our_cpu = median("trio", key, "server_cpu_us")
        their_cpu = median("asyncio", key, "server_cpu_us")
        product = median("gateway", key, "per_second")
        row = {
            "scenario": scenario,
            "size": size,
            "trio_per_second": ours,
            "asyncio_per_second": theirs,
            "ratio": ours / theirs,
            "trio_cpu_us": our_cpu,
            "asyncio_cpu_us": their_cpu,
            "cpu_ratio": their_cpu / our_cpu if our_cpu else float("nan"),
            "gateway_per_second": product,
        }
        rows.append(row)
        print(
            f"| {scenario} | {size} | {ours:,.0f} | {theirs:,.0f} | {row['ratio']:.2f}x | "
            f"{our_cpu:.1f} | {their_cpu:.1f} | {row['cpu_ratio']:.2f}x | {product:,.0f} |"
        )
    print("\nratio = trio msg/s / asyncio msg/s; CPU ratio = asyncio CPU / trio CPU per message")
    if args.json:
        args.json.write_text(json.dumps({"repeats": repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
