"""Helpers shared by the tests: waiting for a condition, serving one source in-process, running
asyncio clients, file-sink readers and a `serve` subprocess runner."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import HandshakeError, open_websocket_url

from trio_gateway import Gateway, Ingress
from trio_gateway._ledger import SourceCounters
from trio_gateway._proto import gateway_pb2
from trio_gateway.queues import OverflowPolicy, Queue
from trio_gateway.sinks import decode_jsonl_record
from trio_gateway.sources import Source
from trio_gateway.testing import ServedSource, serve_source

REPO = Path(__file__).resolve().parent.parent

ROUTED_PIPELINES = """
[pipelines.logs]
route = "level"
[[pipelines.logs.sources]]
transport = "tcp"
listen = "127.0.0.1:0"
[[pipelines.logs.sinks]]
url = "file:{all}"
[[pipelines.logs.sinks]]
url = "pipeline:alerts"
routes = ["error"]

[pipelines.alerts]
[[pipelines.alerts.sinks]]
url = "file:{alerts}"
"""
"""Two pipelines for ``serve``: ``logs`` (TCP, JSON lines) writes everything to ``{all}``
and routes the lines whose ``level`` is ``error`` on to ``alerts`` (to ``{alerts}``)."""

T = TypeVar("T")


def wait_until_sync(
    condition: Callable[[], object], *, timeout: float = 15.0, what: str = ""
) -> None:
    """:func:`wait_until` for a test that drives subprocesses without an event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.02)


async def wait_until(
    condition: Callable[[], object],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a bound on the wait, applied with fail_after
    what: str = "",
) -> None:
    """Wait until ``condition()`` is true, for a counter that has no event to wait on.

    Fails the test after ``timeout`` seconds (virtual ones under ``autojump_clock``), so a broken
    feature fails fast instead of hanging, and a slow machine only makes the wait longer.
    """
    try:
        with trio.fail_after(timeout):
            while not condition():
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what or condition}"
        ) from None


@asynccontextmanager
async def serving(
    source: Source | type[Source],
    queue: Queue[bytes] | None = None,
    *,
    capacity: int = 100_000,
    policy: OverflowPolicy = "block",
    grace_period: float = 1.0,
    timeout: float = 30.0,  # noqa: ASYNC109 - applied with fail_after around the block
    **source_options: Any,
) -> AsyncIterator[ServedSource]:
    """:func:`trio_gateway.testing.serve_source` with the whole block bounded by ``timeout``.

    ``source`` may be a class, built with ``source_options`` (every source defaults to port 0), so a
    transport's tests say ``serving = partial(helpers.serving, HttpSource)`` and then
    ``serving(max_connections=1, capacity=2)``.
    """
    if isinstance(source, type):
        source = source(**source_options)
    elif source_options:
        raise TypeError(f"options {sorted(source_options)} given with a built source")
    with trio.fail_after(timeout):
        async with serve_source(
            source, queue, capacity=capacity, policy=policy, grace_period=grace_period
        ) as served:
            yield served


def detached_ingress(
    queue: Queue[bytes], transport: str, *, grace_period: float = 0.0
) -> tuple[Ingress, trio.Event]:
    """An :class:`~trio_gateway.Ingress` with no source or gateway behind it, and the event that
    stops it: for internals that take an ingress but are not a source (the HTTP source's
    sans-IO rules, ``serve_connections``). A whole source is served with :func:`serving`."""
    stopping = trio.Event()
    counters = SourceCounters(transport, f"{transport}:test")
    return Ingress(queue, counters, stopping, grace_period=grace_period), stopping


def refuses_connections(address: tuple[str, int]) -> bool:
    """True once nothing accepts TCP connections on ``address`` (a listener has closed)."""
    with socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET) as sock:
        return sock.connect_ex(address[:2]) != 0


async def in_asyncio(client: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio client coroutine (``websockets``, ``grpc.aio``) in a worker thread with its
    own event loop."""
    return await trio.to_thread.run_sync(lambda: asyncio.run(client()))  # type: ignore[arg-type]


async def stream_lines_through(gateway: Gateway, lines: list[bytes]) -> None:
    """Run ``gateway`` (its first source a newline TCP listener), send ``lines`` on one
    connection, and stop it once they are all received: its shutdown delivers them."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            async with await trio.open_tcp_stream(*address) as stream:
                await stream.send_all(b"".join(line + b"\n" for line in lines))
            while gateway.ledger.received < len(lines):
                await trio.sleep(0.01)
            gateway.shutdown()


def read_payloads(path: Path) -> list[bytes]:
    """Every payload in a JSONL file written by the file sink, in order."""
    if not path.exists():
        return []
    with path.open("rb") as file:
        return [decode_jsonl_record(line)[0] for line in file]


def ledger_of(stderr: str) -> dict[str, object]:
    """The one ledger line ``serve`` printed on stderr, parsed."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith('{"ledger"')]
    assert len(lines) == 1, stderr
    ledger: dict[str, object] = json.loads(lines[0])["ledger"]
    return ledger


class ServeProcess:
    """``python -m trio_gateway serve ...`` as a subprocess, with its bound ports parsed."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trio_gateway", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.stderr_lines: list[str] = []
        self.ports: dict[str, list[int]] = {}
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        """Read stderr until the "ready" line, collecting the "listening" lines before it."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode()
            if not line:
                raise RuntimeError(f"serve exited early: {''.join(self.stderr_lines)}")
            self.stderr_lines.append(line)
            match = re.search(r"listening: (\w+) on .*:(\d+)$", line.strip()) or re.search(
                r"(admin) endpoint on http://.*:(\d+)/metrics$", line.strip()
            )
            if match:
                self.ports.setdefault(match[1], []).append(int(match[2]))
            elif line.rstrip().endswith(": ready"):
                return
        raise TimeoutError("serve did not report ready")

    def port(self, transport: str, index: int = 0) -> int:
        """A bound port by transport (``"tcp"``, ...; ``"admin"`` for the admin endpoint)."""
        return self.ports[transport][index]

    def status(self, path: str) -> int:
        """The admin endpoint's HTTP status for ``path`` (``/readyz`` is 503 once draining)."""
        url = f"http://127.0.0.1:{self.port('admin')}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def received(self) -> int:
        """Messages received so far, summed over the listeners, from the admin endpoint."""
        url = f"http://127.0.0.1:{self.port('admin')}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("trio_gateway_received_messages_total{")
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        """Send ``sig``, wait, return (exit code, all of stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, "".join(self.stderr_lines) + err.decode()


# -- Prometheus text, gRPC compression, `top` frames ------------------------------------------

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def parse_samples(text: str) -> Samples:
    """Prometheus text -> name -> labels -> value."""
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][frozenset(sample.labels.items())] = sample.value
    return samples


def sample_value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if want <= k)


GZIP = 16 + zlib.MAX_WBITS
DEFLATE = zlib.MAX_WBITS
"""The ``wbits`` of gRPC's two encodings."""


def deflate(data: bytes) -> bytes:
    """gRPC's "deflate": the zlib format (RFC 1950), as grpc-core writes it."""
    return zlib.compress(data)


def bomb(size: int, *, wbits: int = GZIP) -> bytes:
    """``size`` zero bytes (a multiple of 1 MiB) compressed, built without compressing them
    all: one 1 MiB block from a fresh raw deflate state, repeated, then the final block."""
    chunk = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = size >> 20
    body = block * count + b"\x03\x00"  # a final, empty fixed-Huffman block
    if wbits == GZIP:
        crc = 0
        for _ in range(count):
            crc = zlib.crc32(chunk, crc)
        header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
        return header + body + struct.pack("<II", crc, size & 0xFFFFFFFF)
    adler = 1
    for _ in range(count):
        adler = zlib.adler32(chunk, adler)
    return b"\x78\xda" + body + struct.pack(">I", adler)


def table_rows(frame: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every table row of a rendered ``top`` frame
    (borderless tables: cells are at least two spaces apart, words within a cell one)."""
    out: dict[str, list[str]] = {}
    for line in frame.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1 and cells[0]:
            out[cells[0]] = cells[1:]
    return out


# -- clients that present a bearer token: True if the listener took the message -------------


async def http_with_token(address: tuple[str, int], token: str) -> bool:
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"http://{address[0]}:{address[1]}/ingest",
            content=b"t",
            headers={"authorization": f"Bearer {token}"},
        )
        return reply.status_code == 202


async def ws_with_token(address: tuple[str, int], token: str) -> bool:
    try:
        async with open_websocket_url(
            f"ws://{address[0]}:{address[1]}/",
            extra_headers=[(b"authorization", b"Bearer " + token.encode())],
        ) as ws:
            await ws.send_message(b"t")
    except HandshakeError:
        return False
    return True


async def grpc_with_token(address: tuple[str, int], token: str) -> bool:
    def call() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{address[1]}") as channel:
            send = channel.unary_unary(
                "/trio_gateway.v1.Gateway/Send",
                request_serializer=gateway_pb2.Message.SerializeToString,
                response_deserializer=gateway_pb2.Ack.FromString,
            )
            try:
                send(
                    gateway_pb2.Message(payload=b"t"),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=5,
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

    return await trio.to_thread.run_sync(call)


# -- WebSocket by hand -------------------------------------------------------------------------

WS_HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
"""A client's opening handshake for path ``/``, as raw bytes."""


def ws_client_frame(payload: bytes, *, opcode: int = 0x2, fin: bool = True) -> bytes:
    """A client's (masked) frame, any length: binary by default; ``fin=False`` for a fragment."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + masked


def post_until_stopped(
    url: str,
    acknowledged: list[bytes],
    stop: threading.Event,
    tag: int,
    *,
    batch: int = 20,
    pad: int = 0,
) -> None:
    """NDJSON requests of ``batch`` lines ``{"k":tag,"n":N}`` (with ``pad`` bytes of padding
    each), one at a time, until ``stop`` is set or the gateway dies; remember what got a 202."""
    padding = b',"pad":"%s"' % (b"x" * pad) if pad else b""
    n = 0
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            lines = [b'{"k":%d,"n":%d%s}' % (tag, n + i, padding) for i in range(batch)]
            n += batch
            try:
                response = client.post(
                    url, content=b"\n".join(lines), headers={"Content-Type": "application/x-ndjson"}
                )
            except httpx.HTTPError:
                return  # the gateway died with this request unanswered
            if response.status_code == 202:
                acknowledged.extend(lines)


def free_port() -> int:
    """A free TCP port on loopback, for a gateway that must come back on the port it had (a
    restart under a client's feet); everything else binds port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SendProcess:
    """``python -m trio_gateway send ARGS`` in the background: the retrying client of the chaos
    test and ``bench.exactly_once`` (with ``--retries`` it rides out the gateway's restarts)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trio_gateway", "send", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """Wait for the end of the run: (exit status, its summary line and stderr)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out + err


def kill_9_while_sending(
    gateway: ServeProcess,
    client: SendProcess,
    *,
    times: int,
    moment: Callable[[ServeProcess, int], None],
) -> ServeProcess:
    """``kill -9`` the gateway and start it again with the same arguments (the same port),
    ``times`` times while ``client`` runs; ``moment(gateway, restart)`` returns when it is time
    to kill. Returns the gateway started last (running)."""
    for restart in range(times):
        if not client.running():
            break
        moment(gateway, restart)
        gateway.stop(signal.SIGKILL)
        gateway = type(gateway)(gateway.args)
    return gateway
