"""The servers the runner measures, one per process: trio_gateway and its asyncio peers.

    python -m bench._servers IMPL TRANSPORT --size BYTES [--sink null|file:PATH]

``IMPL`` is ``trio_gateway`` (the product: a :class:`~trio_gateway.Gateway` with the real
source, a :class:`~trio_gateway.RingBuffer`, the null or file sink and the admin endpoint, as
``serve`` builds it), ``asyncio`` (a plain asyncio implementation of the same path),
``uvloop`` (the same asyncio code on uvloop's event loop), or one of the servers a user would
pick instead: ``grpcio`` (``grpc.aio``, gRPC only), ``uvicorn-httptools`` (on uvloop) and
``uvicorn-h11`` (HTTP only). Every peer queues into the same :class:`PeerQueue` and answers
as trio_gateway does (``202`` and its body; the same protobuf Ack or Empty).
``TRANSPORT`` is ``tcp``, ``udp``, ``http`` (HTTP/1.1 and h2c), ``ws`` or ``grpc`` (one
server answers the unary ``Send`` and ``MakeRequest`` and the client-streaming ``Stream``).
``--tune-allocator`` applies ``trio_gateway.tuning.tune_allocator`` (what ``serve`` does) to
whichever implementation runs, so that the comparison is between the code, not the allocator.

Every implementation has the same shape: the transport's reader hands each message to a
bounded queue of ``capacity_for(size)`` messages without awaiting while there is room, and a
consumer task takes batches of ``BATCH`` and discards them (null sink) or writes them as JSON
Lines to a file (the same records as trio_gateway's file sink). When the queue is full the
reader waits (TCP: ``pause_reading``; UDP: the datagram is dropped and counted, as the kernel
would drop it for a server that stopped reading).

The control protocol, one line each way on stdin/stdout:

* the server prints ``ready PORT`` once it listens;
* ``arm N``: count from now; the server answers ``armed`` and, as soon as N more messages are
  enqueued (with a file sink: written), prints ``done COUNT T_LAST CPU``;
* ``report``: the server answers ``count COUNT T_LAST CPU`` (the runner's way out when UDP
  lost messages, or when a case times out); ``disarm`` stops counting (answer ``disarmed``);
* ``quit`` or end of input: the server stops (trio_gateway flushes and logs its ledger).

``--profile PATH`` runs cProfile from each ``arm`` until its count is reached (or ``disarm``)
and writes the stats on quit: :mod:`bench.profile` reads them.

``COUNT`` is the number of messages since ``arm``, ``T_LAST`` the ``time.monotonic()`` at
which the count was last seen to change (the clock is system-wide, so the runner compares it
with its own), and ``CPU`` the process's CPU seconds since ``arm``. While armed, the count is
polled every 2 ms (both implementations pay the same for it); unarmed, nothing polls.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench._servers")

IMPLS = ("trio_gateway", "asyncio", "uvloop", "grpcio", "uvicorn-httptools", "uvicorn-h11")
TRANSPORTS = ("tcp", "udp", "http", "ws", "grpc")
BATCH = 1024
"""Messages per consumer batch: the gateway's default ``batch_size``."""
MAX_MESSAGE = 1 << 20
"""Largest message any server accepts (the sources' default ``max_message_size``)."""
RECEIVE_BUFFER = 4 << 20
"""UDP ``SO_RCVBUF`` for every implementation (UdpSource's default)."""
POLL = 0.002


def capacity_for(size: int) -> int:
    """Queue capacity in messages: the gateway's default 10 000, capped at 64 MiB of payload."""
    return max(64, min(10_000, (64 << 20) // size))


class Counter:
    """What the control loop reports: a count since ``arm``, when it last moved, CPU time."""

    profiling = False
    """``--profile``: each ``arm`` starts a fresh ``cProfile.Profile``, on until the target is
    reached; the last one is written on quit (so a warm-up run is left out of it)."""
    profiler: Any = None

    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read
        self.base = 0
        self.target: int | None = None
        self.last = 0
        self.t_last = time.monotonic()
        self.cpu0 = time.process_time()

    def arm(self, n: int) -> None:
        self.base = self.last = self.read()
        self.t_last = time.monotonic()
        self.cpu0 = time.process_time()
        self.target = n
        if self.profiling:
            import cProfile

            # cProfile's default clock (wall time, cheap to read): bench.profile leaves the time
            # spent waiting in epoll out (a CPU-time clock costs a system call a reading here
            # and inflated the figures 6x).
            Counter.profiler = cProfile.Profile()
            Counter.profiler.enable()

    def poll(self) -> str | None:
        """Update; return the ``done`` line once the target is reached."""
        now = self.read()
        if now != self.last:
            self.last = now
            self.t_last = time.monotonic()
        if self.target is not None and now - self.base >= self.target:
            self.target = None
            self.stop_profile()
            return "done " + self._figures()
        return None

    def stop_profile(self) -> None:
        if self.profiler is not None:
            self.profiler.disable()

    def report(self) -> str:
        self.poll()
        return "count " + self._figures()

    def _figures(self) -> str:
        return f"{self.last - self.base} {self.t_last!r} {time.process_time() - self.cpu0!r}"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- trio_gateway ------------------------------------------------------------------------------


def serve_trio_gateway(transport: str, size: int, sink_spec: str) -> None:
    import trio

    from trio_gateway import (
        FileSink,
        Gateway,
        GrpcSource,
        HttpSource,
        NullSink,
        RingBuffer,
        TcpSource,
        UdpSource,
        WebSocketSource,
    )
    from trio_gateway.admin import AdminServer
    from trio_gateway.sinks import Sink
    from trio_gateway.sources import Source

    idle = 600.0
    source: Source
    if transport == "tcp":
        source = TcpSource(max_message_size=MAX_MESSAGE, idle_timeout=idle)
    elif transport == "udp":
        source = UdpSource(receive_buffer=RECEIVE_BUFFER)
    elif transport == "http":
        source = HttpSource(max_message_size=MAX_MESSAGE, idle_timeout=idle)
    elif transport == "ws":
        source = WebSocketSource(max_message_size=MAX_MESSAGE, idle_timeout=idle)
    else:
        source = GrpcSource(max_message_size=MAX_MESSAGE, idle_timeout=idle)
    sink: Sink = FileSink(sink_spec[5:]) if sink_spec.startswith("file:") else NullSink()
    gateway = Gateway(
        sources=[source],
        services=[AdminServer("127.0.0.1", 0)],  # on, as `serve` runs it by default
        sink=sink,
        queue=RingBuffer(capacity_for(size), policy="block"),
        batch_size=BATCH,
        grace_period=0.2,
        drain_timeout=30.0,
    )
    if isinstance(sink, FileSink):
        # The file case counts records written, not enqueued: the sink is what is measured.
        pump = gateway.pump_counters

        def read() -> int:
            return pump.delivered
    else:
        counters = gateway.source_counters

        def read() -> int:
            return sum(c.received for c in counters)

    counter = Counter(read)

    async def control() -> None:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        pending = b""
        armed = trio.Event()

        async def poller() -> None:
            nonlocal armed
            while True:
                await armed.wait()
                while counter.target is not None:
                    done = counter.poll()
                    if done:
                        say(done)
                        break
                    await trio.sleep(POLL)
                armed = trio.Event()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller)
            while True:
                while b"\n" not in pending:
                    data = await stdin.receive_some(4096)
                    if not data:
                        nursery.cancel_scope.cancel()
                        return
                    pending += data
                line, _, pending = pending.partition(b"\n")
                command = line.decode().split()
                if not command:
                    continue
                if command[0] == "arm":
                    counter.arm(int(command[1]))
                    say("armed")
                    armed.set()
                elif command[0] == "report":
                    say(counter.report())
                elif command[0] == "disarm":
                    counter.target = None
                    counter.stop_profile()
                    say("disarmed")
                elif command[0] == "quit":
                    nursery.cancel_scope.cancel()
                    return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            say(f"ready {bound[0][0][1]}")
            await control()
            gateway.shutdown()
        sys.stderr.write(gateway.ledger.to_json() + "\n")

    trio.run(main)


# -- the asyncio peers -------------------------------------------------------------------------


class PeerQueue:
    """A bounded queue of payloads for the asyncio peers, built the way the gateway's is.

    ``put_many_nowait`` takes what fits with no await; ``put`` awaits only when full; the
    consumer takes batches of up to ``BATCH`` and hands them to ``sink``. Origins travel as
    runs ``[origin, count]`` beside the payloads (needed by the JSON Lines writer only).
    """

    def __init__(self, capacity: int, sink: Callable[[list[bytes], list[Any]], None]) -> None:
        import asyncio

        self.capacity = capacity
        self.items: deque[bytes] = deque()
        self.runs: deque[list[Any]] = deque()
        self.sink = sink
        self.enqueued = 0
        self.written = 0
        self.dropped = 0
        self.not_empty = asyncio.Event()
        self.not_full = asyncio.Event()
        self.not_full.set()
        self.paused: list[Any] = []

    def put_many_nowait(self, payloads: Sequence[bytes], origin: Any) -> int:
        room = self.capacity - len(self.items)
        n = len(payloads)
        if n > room:
            payloads = payloads[:room]
            n = room
            self.not_full.clear()
        if n:
            self.items.extend(payloads)
            self.runs.append([origin, n])
            self.enqueued += n
            self.not_empty.set()
        return n

    async def put(self, payload: bytes, origin: Any) -> None:
        while not self.put_many_nowait((payload,), origin):
            await self.not_full.wait()

    async def consume(self) -> None:
        items, runs = self.items, self.runs
        while True:
            if not items:
                self.not_empty.clear()
                await self.not_empty.wait()
            n = min(len(items), BATCH)
            if n == len(items):
                batch = list(items)
                items.clear()
                taken = list(runs)
                runs.clear()
            else:
                popleft = items.popleft
                batch = [popleft() for _ in range(n)]
                taken = []
                left = n
                while left:
                    run = runs[0]
                    if run[1] <= left:
                        taken.append(runs.popleft())
                        left -= run[1]
                    else:
                        taken.append([run[0], left])
                        run[1] -= left
                        left = 0
            self.sink(batch, taken)
            self.written += n
            self.not_full.set()
            if self.paused:
                paused, self.paused = self.paused, []
                for protocol in paused:
                    protocol.resume()
            # One turn of the loop per batch, as the gateway's pump takes one per batch.
            await _yield()


async def _yield() -> None:
    import asyncio

    await asyncio.sleep(0)


def encode_jsonl_reference(transport: str, payloads: list[bytes], runs: list[Any]) -> bytes:
    """The asyncio peer's JSON Lines: trio_gateway's record format, written the careful way
    (one prefix per run of messages from one read, the C string encoder per payload, one
    ``join``). ``runs`` holds ``[(peer, received_at), count]``."""
    parts: list[str] = []
    append = parts.append
    quoted = json.dumps(transport)
    start = 0
    for (peer, received_at), count in runs:
        head = f'{{"transport":{quoted},"peer":{json.dumps(peer)},"received_at":{received_at!r},'
        for payload in payloads[start : start + count]:
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                append(head + '"payload_b64":"' + base64.b64encode(payload).decode() + '"}\n')
            else:
                append(head + '"payload":' + encode_basestring_ascii(text) + "}\n")
        start += count
    return "".join(parts).encode("ascii")


def jsonl_writer(path: str, transport: str) -> Callable[[list[bytes], list[Any]], None]:
    """The peer's file sink: :func:`encode_jsonl_reference`, one write + flush per batch, in
    the event loop (a local file write does not block for long)."""
    file = open(path, "ab")  # noqa: SIM115 - open for the life of the process

    def sink(payloads: list[bytes], runs: list[Any]) -> None:
        file.write(encode_jsonl_reference(transport, payloads, runs))
        file.flush()

    return sink


def serve_asyncio(impl: str, transport: str, size: int, sink_spec: str) -> None:
    import asyncio

    if sink_spec.startswith("file:"):
        sink = jsonl_writer(sink_spec[5:], transport)
    else:

        def sink(payloads: list[bytes], runs: list[Any]) -> None:
            pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = PeerQueue(capacity_for(size), sink)
        consumer = loop.create_task(queue.consume())
        if sink_spec.startswith("file:"):
            counter = Counter(lambda: queue.written)
        else:
            counter = Counter(lambda: queue.enqueued)
        make = PEERS[transport] if impl in ("asyncio", "uvloop") else OTHER_PEERS[impl, transport]
        closer = await make(queue)
        say(f"ready {closer.port}")
        poller: asyncio.Task[None] | None = None

        async def poll() -> None:
            while counter.target is not None:
                done = counter.poll()
                if done:
                    say(done)
                    return
                await asyncio.sleep(POLL)

        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            command = line.decode().split()
            if not line or (command and command[0] == "quit"):
                break
            if not command:
                continue
            if command[0] == "arm":
                counter.arm(int(command[1]))
                say("armed")
                if poller is None or poller.done():
                    poller = loop.create_task(poll())
            elif command[0] == "report":
                say(counter.report())
            elif command[0] == "disarm":
                counter.target = None
                counter.stop_profile()
                say("disarmed")
        await closer.close()
        consumer.cancel()
        sys.stderr.write(json.dumps({"enqueued": queue.enqueued, "dropped": queue.dropped}) + "\n")

    if impl in UVLOOP:
        import uvloop as _uvloop

        _uvloop.run(main())
    else:
        asyncio.run(main())


class Closer:
    def __init__(self, port: int, close: Callable[[], Any]) -> None:
        self.port = port
        self._close = close

    async def close(self) -> None:
        result = self._close()
        if result is not None and hasattr(result, "__await__"):
            await result


def _peer(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if address else ""


async def tcp_peer(queue: PeerQueue) -> Closer:
    """asyncio Protocol: one ``bytes.split`` per read, the remainder glued onto the next
    read's first frame, every frame of a read queued at once, ``pause_reading`` when full."""
    import asyncio

    class Reader(asyncio.Protocol):
        def __init__(self) -> None:
            self.rest = b""
            self.pending: list[bytes] = []
            self.origin: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.peer = _peer(transport.get_extra_info("peername"))

        def data_received(self, data: bytes) -> None:
            frames = data.split(b"\n")
            if self.rest:
                frames[0] = self.rest + frames[0]
            self.rest = frames.pop()
            if len(self.rest) > MAX_MESSAGE:
                self.transport.close()
                return
            if b"" in frames:
                frames = [frame for frame in frames if frame]
            if frames:
                self.offer(frames)

        def offer(self, frames: list[bytes]) -> None:
            self.origin = (self.peer, time.time())
            accepted = queue.put_many_nowait(frames, self.origin)
            if accepted < len(frames):
                self.pending = frames[accepted:]
                self.transport.pause_reading()
                queue.paused.append(self)

        def resume(self) -> None:
            pending, self.pending = self.pending, []
            accepted = queue.put_many_nowait(pending, self.origin)
            if accepted < len(pending):
                self.pending = pending[accepted:]
                queue.paused.append(self)
            else:
                self.transport.resume_reading()

        def eof_received(self) -> bool:
            return False

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Reader, "127.0.0.1", 0)

    async def close() -> None:
        server.close()

    return Closer(server.sockets[0].getsockname()[1], close)


async def udp_peer(queue: PeerQueue) -> Closer:
    """asyncio DatagramProtocol: one callback per datagram, queued at once (dropped and
    counted when the queue is full); the same ``SO_RCVBUF`` as UdpSource."""
    import asyncio

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not queue.put_many_nowait((data,), addr):
                queue.dropped += 1

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Receiver, sock=sock)
    return Closer(sock.getsockname()[1], transport.close)


def ingest_app(queue: PeerQueue) -> Callable[..., Any]:
    """The plain ASGI app every HTTP peer runs: ``POST /ingest``, body = one message, ``202``
    with trio_gateway's body once queued (``413`` past the size limit)."""
    accepted = json.dumps({"accepted": 1}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(accepted))]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            body = message.get("body", b"")
            total += len(body)
            chunks.append(body)
            if not message.get("more_body"):
                break
        if total > MAX_MESSAGE or scope["method"] != "POST" or scope["path"] != "/ingest":
            await send({"type": "http.response.start", "status": 413, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await queue.put(chunks[0] if len(chunks) == 1 else b"".join(chunks), scope["client"])
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": accepted})

    return app


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


async def http_peer(queue: PeerQueue) -> Closer:
    """hypercorn's asyncio worker running :func:`ingest_app`, keep-alive; it also speaks h2c
    (HTTP/2 with prior knowledge), which the h2c rows use."""
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = _listening_socket()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn serves (and owns) it: port 0, no race
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 600
    config.keep_alive_max_requests = 1 << 30  # hypercorn closes after 1000 by default
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        serve(ingest_app(queue), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    )
    await _wait_listening(port)

    async def close() -> None:
        stop.set()
        await asyncio.wait_for(task, 5)

    return Closer(port, close)


async def uvicorn_peer(queue: PeerQueue, http: str) -> Closer:
    """uvicorn running :func:`ingest_app` with its ``httptools`` or ``h11`` protocol, on the
    loop it was started on (uvloop for httptools, as ``uvicorn[standard]`` runs it)."""
    import asyncio

    import uvicorn

    sock = _listening_socket()
    config = uvicorn.Config(
        ingest_app(queue),
        http=http,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=600,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)

    async def close() -> None:
        server.should_exit = True
        await asyncio.wait_for(task, 5)

    return Closer(sock.getsockname()[1], close)


async def _wait_listening(port: int) -> None:
    import asyncio

    for _ in range(500):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listens on {port}")


async def ws_peer(queue: PeerQueue) -> Closer:
    """The ``websockets`` asyncio server: ``async for message in ws``, each one queued."""
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        origin = ws.remote_address
        put = queue.put
        async for message in ws:
            await put(message if isinstance(message, bytes) else message.encode(), origin)

    server = await serve(handler, "127.0.0.1", 0, compression=None, max_size=MAX_MESSAGE)
    port = next(iter(server.sockets)).getsockname()[1]

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return Closer(port, close)


async def grpc_peer(queue: PeerQueue) -> Closer:
    """grpclib's asyncio server with the same generated services: ``Send`` and the talk's
    ``MakeRequest`` queue one message and answer an Ack (an Empty); ``Stream`` queues each
    message as it is parsed, one Ack at the end."""
    from grpclib.server import Server

    from trio_gateway._proto import gateway_pb2, model_pb2
    from trio_gateway._proto.gateway_grpc import GatewayBase
    from trio_gateway._proto.model_grpc import GrpcUnaryInputterServiceBase

    class Peer(GatewayBase):  # type: ignore[misc]
        async def Send(self, stream: Any) -> None:
            message = await stream.recv_message()
            await queue.put(message.payload, stream.peer)
            await stream.send_message(
                gateway_pb2.Ack(sequence=message.sequence, accepted=True, accepted_count=1)
            )

        async def Stream(self, stream: Any) -> None:
            count = 0
            async for message in stream:
                await queue.put(message.payload, stream.peer)
                count += 1
            await stream.send_message(gateway_pb2.Ack(accepted=True, accepted_count=count))

        async def StreamAcked(self, stream: Any) -> None:
            async for message in stream:
                await queue.put(message.payload, stream.peer)
                await stream.send_message(gateway_pb2.Ack(sequence=message.sequence, accepted=True))

    class Unary(GrpcUnaryInputterServiceBase):  # type: ignore[misc]
        async def MakeRequest(self, stream: Any) -> None:
            request = await stream.recv_message()
            await queue.put(request.message.encode(), stream.peer)
            await stream.send_message(model_pb2.Empty())

    server = Server([Peer(), Unary()])
    await server.start("127.0.0.1", 0)
    sockets = server._server.sockets if server._server else []  # grpclib exposes no port
    port = sockets[0].getsockname()[1]

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return Closer(port, close)


async def grpcio_peer(queue: PeerQueue) -> Closer:
    """grpcio's asyncio server (``grpc.aio``: the C core does HTTP/2, the handlers are Python
    coroutines): the same three methods, the same answers as the grpclib peer."""
    import grpc

    from trio_gateway._proto import gateway_pb2, model_pb2

    Message, Ack, Request = gateway_pb2.Message, gateway_pb2.Ack, model_pb2.Request

    async def send(message: Any, context: Any) -> Any:
        await queue.put(message.payload, context.peer())
        return Ack(sequence=message.sequence, accepted=True, accepted_count=1)

    async def stream(messages: Any, context: Any) -> Any:
        count = 0
        peer = context.peer()
        async for message in messages:
            await queue.put(message.payload, peer)
            count += 1
        return Ack(accepted=True, accepted_count=count)

    async def make_request(request: Any, context: Any) -> Any:
        await queue.put(request.message.encode(), context.peer())
        return model_pb2.Empty()

    gateway = grpc.method_handlers_generic_handler(
        "trio_gateway.v1.Gateway",
        {
            "Send": grpc.unary_unary_rpc_method_handler(
                send,
                request_deserializer=Message.FromString,
                response_serializer=Ack.SerializeToString,
            ),
            "Stream": grpc.stream_unary_rpc_method_handler(
                stream,
                request_deserializer=Message.FromString,
                response_serializer=Ack.SerializeToString,
            ),
        },
    )
    model = grpc.method_handlers_generic_handler(
        "model.GrpcUnaryInputterService",
        {
            "MakeRequest": grpc.unary_unary_rpc_method_handler(
                make_request,
                request_deserializer=Request.FromString,
                response_serializer=model_pb2.Empty.SerializeToString,
            )
        },
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((gateway, model))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def close() -> None:
        await server.stop(0)

    return Closer(port, close)


PEERS: dict[str, Callable[[PeerQueue], Any]] = {
    "tcp": tcp_peer,
    "udp": udp_peer,
    "http": http_peer,
    "ws": ws_peer,
    "grpc": grpc_peer,
}
"""The plain asyncio peer of each transport (the ``asyncio`` and ``uvloop`` implementations)."""
OTHER_PEERS: dict[tuple[str, str], Callable[[PeerQueue], Any]] = {
    ("grpcio", "grpc"): grpcio_peer,
    ("uvicorn-httptools", "http"): lambda queue: uvicorn_peer(queue, "httptools"),
    ("uvicorn-h11", "http"): lambda queue: uvicorn_peer(queue, "h11"),
}
"""The servers a user would pick instead, by (implementation, transport)."""
UVLOOP = ("uvloop", "uvicorn-httptools")
"""The implementations that run on uvloop (uvicorn picks it with httptools when installed)."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("impl", choices=IMPLS)
    parser.add_argument("transport", choices=TRANSPORTS)
    parser.add_argument("--size", type=int, required=True, help="message size (sets capacity)")
    parser.add_argument("--sink", default="null", help="null, or file:PATH (JSON Lines)")
    parser.add_argument(
        "--tune-allocator",
        action="store_true",
        help="apply trio_gateway's glibc settings (what serve does), whatever the implementation",
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="profile (cProfile) from each arm to its count, and write the stats here on quit",
    )
    args = parser.parse_args(argv)
    other = args.impl not in ("trio_gateway", "asyncio", "uvloop")
    if other and (args.impl, args.transport) not in OTHER_PEERS:
        parser.error(f"{args.impl} does not serve {args.transport}")
    if args.tune_allocator:
        from trio_gateway.tuning import tune_allocator

        tune_allocator()
    Counter.profiling = bool(args.profile)
    if args.impl == "trio_gateway":
        serve_trio_gateway(args.transport, args.size, args.sink)
    else:
        serve_asyncio(args.impl, args.transport, args.size, args.sink)
    if Counter.profiler is not None:
        Counter.profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
