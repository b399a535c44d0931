"""The chat relay bench's sender and receiver (``bench.chat_relay --role send|receive``).

Each runs in a process of its own. The URL's scheme picks the protocol:

- ``ws://``: WebSocket, through ``websockets``' sans-I/O protocol over blocking sockets
  (``bench/_wsclient.py``), or through that library's own sync sender and asyncio receiver
  (``client="websockets"``). One masked frame per message, in one write.
- ``nats://HOST:PORT/SUBJECT``: core NATS on a blocking socket, for the relay without
  gateways (``--relays direct``): the sender publishes each message with one ``PUB`` in one
  write, the receiver subscribes to the subject. What that run measures is the nats-server
  and the clients alone: the floor under any relay through it on this machine.

The sender stamps each message with ``time.perf_counter_ns()`` (CLOCK_MONOTONIC on Linux:
one clock for every process of the machine) and the receiver subtracts it on arrival.
"""

from __future__ import annotations

import gc
import json
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from bench._wsclient import WsClient

__all__ = ("ROOM", "receive", "send")

ROOM = "bench"


def send(url: str, rate: float, count: int, first: int, client: str) -> None:
    """Send ``count`` messages at ``rate`` per second on one connection; print the seconds."""
    if url.startswith("nats://"):
        nats = _NatsClient(url)
        _freeze()
        _send_paced(nats.publish, rate, count, first)
        nats.close()
    elif client == "websockets":
        from websockets.sync.client import connect

        with connect(url, compression=None) as ws:
            _freeze()
            _send_paced(ws.send, rate, count, first)
    else:
        lean = WsClient(url)
        _freeze()
        _send_paced(lean.send, rate, count, first)
        lean.close()


def _send_paced(write: Callable[[str], object], rate: float, count: int, first: int) -> None:
    print("ready", flush=True)
    sys.stdin.readline()  # go
    clock = time.perf_counter
    stamp = time.perf_counter_ns
    start, cpu, preempted = clock(), time.process_time(), _preempted()
    sent = 0
    while sent < count:
        # What is due goes at once, so a slow tick does not lower the rate.
        due = min(count, int((clock() - start) * rate) + 1)
        while sent < due:
            write(f'{{"room":"{ROOM}","t":{stamp()},"n":{first + sent}}}')
            sent += 1
        pause = start + sent / rate - clock()
        if pause > 0:
            time.sleep(pause)
    seconds = clock() - start
    report = {
        "seconds": seconds,
        "cpu": time.process_time() - cpu,
        "preempted": _preempted() - preempted,
    }
    print(json.dumps(report), flush=True)


def _freeze() -> None:
    """The clients freeze their start as ``serve`` does (``tuning.freeze_startup_objects``):
    a full collection of the measuring process (20 ms and more) is not the relay's latency."""
    gc.collect()
    gc.freeze()


def _preempted() -> int:
    """This process's involuntary context switches: the scheduler took the core away."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


class _Latencies:
    """What the receiver measured: each message's latency, and its stages' under --stages."""

    def __init__(self) -> None:
        self.total: list[float] = []
        self.to_a: list[float] = []
        self.a_to_b: list[float] = []
        self.b_to_client: list[float] = []
        self.cpu = 0.0
        self.preempted = 0

    def take(self, data: str | bytes) -> None:
        message = json.loads(data)
        now = time.perf_counter_ns()
        if not self.total:
            self.cpu, self.preempted = time.process_time(), _preempted()
        if message.get("n", 0) < 0:
            return  # a warm-up message
        self.total.append((now - message["t"]) / 1e9)
        if "a" in message and "b" in message:
            self.to_a.append((message["a"] - message["t"]) / 1e9)
            self.a_to_b.append((message["b"] - message["a"]) / 1e9)
            self.b_to_client.append((now - message["b"]) / 1e9)

    def print(self) -> None:
        report = {
            "total": self.total,
            "to_a": self.to_a,
            "a_to_b": self.a_to_b,
            "b_to_client": self.b_to_client,
            "cpu": time.process_time() - self.cpu,
            "preempted": _preempted() - self.preempted,
        }
        print(json.dumps(report), flush=True)


def _time_is_up(signum: int, frame: object) -> None:
    raise TimeoutError


def receive(url: str, count: int, timeout: float, client: str) -> None:
    """Read messages of the room until ``count`` arrived or ``timeout``; print the latencies
    (ms, and the stages' when the messages carry them)."""
    got = _Latencies()
    if client == "websockets" and not url.startswith("nats://"):
        import asyncio

        from websockets.asyncio.client import connect

        async def main() -> None:
            async with connect(url, compression=None, max_queue=None) as ws:
                _freeze()
                print("ready", flush=True)
                try:
                    async with asyncio.timeout(timeout):
                        while len(got.total) < count:
                            got.take(await ws.recv())
                except TimeoutError:
                    pass

        asyncio.run(main())
        got.print()
        return
    lean: WsClient | _NatsClient
    if url.startswith("nats://"):
        lean = _NatsClient(url)
        lean.subscribe()
    else:
        lean = WsClient(url)
    _freeze()
    print("ready", flush=True)
    # Blocking reads, bounded by an alarm: a socket timeout would poll before each read.
    signal.signal(signal.SIGALRM, _time_is_up)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        for data in lean.messages():
            got.take(data)
            if len(got.total) >= count:
                break
    except TimeoutError:
        pass
    signal.setitimer(signal.ITIMER_REAL, 0)
    lean.close()
    got.print()


class _NatsClient:
    """Core NATS on a blocking socket, as lean as the WebSocket clients: ``PUB`` per message
    in one write, and ``MSG`` read back from a subscription (answering the server's
    ``PING``).

    It reads lines from a buffered file rather than through the gateway's own sans-I/O
    parser (``sinks/_nats_protocol.py``): with the parser the receiver took 44-51 % of a core
    at 10,000 msg/s against 27 % (two interleaved runs each), and this client is the floor
    the relays are measured against."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.subject = parts.path.strip("/").encode()
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.file.readline()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        self._expect_pong()
        self.sock.settimeout(None)

    def _expect_pong(self) -> None:
        line = self.file.readline()
        if line != b"PONG\r\n":
            raise ConnectionError(f"the nats-server answered {line!r}")

    def publish(self, text: str) -> None:
        data = text.encode()
        self.sock.sendall(b"PUB %s %d\r\n%s\r\n" % (self.subject, len(data), data))

    def subscribe(self) -> None:
        self.sock.sendall(b"SUB %s 1\r\nPING\r\n" % self.subject)
        self._expect_pong()  # subscribed before the sender starts

    def messages(self) -> Iterator[bytes]:
        read = self.file.readline
        while line := read():
            if line.startswith(b"MSG "):
                size = int(line.rsplit(None, 1)[1])
                yield self.file.read(size + 2)[:size]
            elif line == b"PING\r\n":
                self.sock.sendall(b"PONG\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def main_role(role: str, args: list[str], client: str) -> None:
    """``--role send URL RATE COUNT FIRST`` or ``--role receive URL COUNT TIMEOUT``."""
    if role == "send":
        url, rate, count, first = args
        send(url, float(rate), int(count), int(first), client)
    else:
        url, count, timeout = args
        receive(url, int(count), float(timeout), client)
