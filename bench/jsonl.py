"""ns per record for the JSON Lines encoding of the file and stdout sinks, at the talk's sizes.

    python -m bench.jsonl [--messages N] [--repeats N] [--json FILE]

Batches of up to ``BATCH`` messages (fewer for large ones: about 8 MiB a batch) from one
origin (one TCP read), encoded by:

* ``trio_gateway``: ``trio_gateway.sinks._jsonl.encode_jsonl``, what FileSink and StdoutSink
  write;
* ``reference``: :func:`bench._servers.encode_jsonl_reference`, the asyncio peer's encoder:
  one prefix per run, ``encode_basestring_ascii`` per payload, one join.

Both must produce the same bytes (checked before timing). The process runs with
``tune_allocator`` (as ``serve`` does; large batches otherwise pay page faults for every
output buffer, whichever encoder). The figure is the median over
``--repeats`` of the time to encode ``--messages`` messages (at most 64 MiB), per message.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.jsonl")

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from trio_gateway import Batch, Origin
from trio_gateway.sinks._jsonl import encode_jsonl
from trio_gateway.tuning import tune_allocator

from ._payloads import SIZES, payloads
from ._servers import encode_jsonl_reference

BATCH = 1024
ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:51234", 1_700_000_000.123456)


def batch_size(size: int) -> int:
    return max(16, min(BATCH, (8 << 20) // size))


def encoders(size: int) -> dict[str, Callable[[], bytes]]:
    n = batch_size(size)
    messages = list(payloads(size, n))
    batch = Batch(messages, [(ORIGIN, n)])
    runs = [[(ORIGIN.peer, ORIGIN.received_at), n]]
    return {
        "trio_gateway": lambda: encode_jsonl(batch),
        "reference": lambda: encode_jsonl_reference("tcp", messages, runs),
    }


def measure(messages: int, repeats: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for size in SIZES:
        funcs = encoders(size)
        outputs = {name: func() for name, func in funcs.items()}
        if outputs["trio_gateway"] != outputs["reference"]:
            raise SystemExit(f"{size} B: the two encoders disagree")
        n = batch_size(size)
        batches = max(1, min(messages, (64 << 20) // size) // n)
        samples: dict[str, list[float]] = {name: [] for name in funcs}
        for _ in range(repeats):
            for name, func in funcs.items():  # interleaved: drift hits both alike
                gc.collect()
                start = time.perf_counter_ns()
                for _ in range(batches):
                    func()
                samples[name].append((time.perf_counter_ns() - start) / (batches * n))
        ours = statistics.median(samples["trio_gateway"])
        theirs = statistics.median(samples["reference"])
        rows.append(
            {
                "size": size,
                "batch": n,
                "record_bytes": round(len(outputs["trio_gateway"]) / n, 1),
                "trio_gateway_ns": round(ours, 1),
                "reference_ns": round(theirs, 1),
                "speedup": round(theirs / ours, 2),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="per size and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    tune_allocator()
    rows = measure(args.messages, args.repeats)
    print(f"JSON Lines encoding, batches of {BATCH} from one origin; ns per record (median)\n")
    print("| size (B) | record (B) | trio_gateway | reference | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['size']} | {row['record_bytes']} | {row['trio_gateway_ns']:,} "
            f"| {row['reference_ns']:,} | {row['speedup']}x |"
        )
    if args.json:
        document = {
            "benchmark": "jsonl",
            "batch": BATCH,
            "messages": args.messages,
            "repeats": args.repeats,
            "results": rows,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
