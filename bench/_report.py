"""Turn a results document (``bench/results/<date>.json``) into tables, charts and the page.

    python -m bench._report RESULTS.json [--out DIR]

regenerates ``docs/benchmarks.md``'s generated blocks and ``docs/img/bench-*.png`` from a saved
results file, without measuring anything. The page keeps its prose: only the text between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` is replaced.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._payloads import SIZES

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench._report")

ROOT = Path(__file__).resolve().parent.parent
SIZE_NAMES = {18: "small", 4266: "medium", 6786: "large", 79435: "very large"}
TABLE_ROWS = ("http", "grpc-unary", "udp", "tcp", "ws", "grpc-frames", "grpc-stream")
WIRE_ROWS = ("grpc-send", "grpc-make", "http-wire", "h2c")
"""The rows measured with 1 and N requests or calls in flight, beside every peer."""
PEERS = {"udp": "asyncio"}
"""The peer each row's ratio is taken against (``asyncio`` unless named here)."""

# The talk's published figures (ns/op, Go, the article's machine; None = not published). The
# article's table lost its cell separators; this is our reading of the digit runs, which is
# unambiguous except Unary HTTP with parallel sending ("44874403084046198686": read as
# 44874 40308 40461 98686; 4487 44030 84046 198686 is also possible).
GO_TRANSPORTS: dict[str, dict[bool, list[int | None]]] = {
    "Unary HTTP": {False: [46942, 57682, 58412, 170765], True: [44874, 40308, 40461, 98686]},
    "Unary gRPC": {False: [70816, 93274, 92594, 212194], True: [18813, 25950, 28199, 127414]},
    "Unary UDP": {False: [10647, 12890, 13388, None], True: [1775, 2801, 3063, None]},
    "Streaming UDP": {False: [1955, 3544, 4400, None], True: [2324, 4010, 4543, None]},
    "Streaming TCP": {False: [3261, None, None, None], True: [3106, None, None, None]},
    "Streaming WebSocket": {False: [3769, 10107, 10646, 120604], True: [1090, 4498, 4951, 47776]},
    "Streaming gRPC": {False: [3004, 9883, 13296, 123162], True: [1075, 6810, 8813, 73845]},
}
GO_QUEUES: dict[str, list[int]] = {
    "Array & Mutices": [15969, 16370, 15961, 15947],
    "Channel": [6888, 6862, 6805, 6416],
    "Ring Buffer & Mutices": [11812, 11869, 13097, 11891],
    "Ring Buffer & Atomics": [6339, 6199, 6317, 6177],
}
QUEUE_ROWS = (
    ("locked_list", "LockedListQueue (array + lock)", "Array & Mutices"),
    ("channel", "ChannelQueue (memory channel)", "Channel"),
    ("locked_ring", "LockedRingBuffer (ring + lock)", "Ring Buffer & Mutices"),
    ("ring", "RingBuffer (ring, no lock)", "Ring Buffer & Atomics"),
    ("deque", "collections.deque (floor, no policy)", ""),
)
TARGETS_NOTE = "ratio = the other's ns/op / ours: above 1.0x, trio_gateway is faster"


class Results:
    """Indexed access to a results document."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.doc = document
        self.by_key: dict[tuple[str, int, bool, str], dict[str, Any]] = {}
        for result in document["results"]:
            key = (result["row"], result["size"], result["parallel"], result["impl"])
            self.by_key[key] = result
        self.titles = {row["key"]: row["title"] for row in document["rows"]}
        self.peers = {row["key"]: row["peer"] for row in document["rows"]}
        self.impls = {row["key"]: row["impls"] for row in document["rows"]}
        self.names = {row["key"]: row.get("names", {}) for row in document["rows"]}
        self.sizes: list[int] = document["settings"]["sizes"]

    def get(self, row: str, size: int, parallel: bool, impl: str) -> dict[str, Any] | None:
        return self.by_key.get((row, size, parallel, impl))

    def ns(self, row: str, size: int, parallel: bool, impl: str, cpu: bool = False) -> float | None:
        result = self.get(row, size, parallel, impl)
        if result is None:
            return None
        value = result["median_cpu_ns_per_op" if cpu else "median_ns_per_op"]
        return float(value) if value else None

    def client_cpu(self, row: str, size: int, parallel: bool, impl: str) -> float | None:
        result = self.get(row, size, parallel, impl)
        value = None if result is None else result.get("median_client_cpu_ns_per_op")
        return float(value) if value else None

    def name(self, row: str, impl: str) -> str:
        """What the report calls ``impl`` in ``row``."""
        if impl == "asyncio":
            return self.peers[row]
        return str(self.names.get(row, {}).get(impl, impl))

    def ratio(
        self, row: str, size: int, parallel: bool, other: str, cpu: bool = False
    ) -> float | None:
        ours = self.ns(row, size, parallel, "trio_gateway", cpu)
        theirs = self.ns(row, size, parallel, other, cpu)
        return theirs / ours if ours and theirs else None

    def sender_bound(
        self, row: str, size: int, parallel: bool, impls: Sequence[str]
    ) -> float | None:
        """If every run of every one of ``impls`` lost nothing and ended within 1% (or 1 ms)
        of its clients' last send, the case measured the clients, not the servers: the
        largest lag in seconds; else None."""
        lags = []
        for impl in impls:
            result = self.get(row, size, parallel, impl)
            samples = [] if result is None else result.get("samples", [])
            good = [s for s in samples if s.get("status") == "ok" and s.get("client_s")]
            if not good:
                return None
            for sample in good:
                lag = sample["elapsed_s"] - sample["client_s"]
                if sample.get("loss") or lag > max(0.01 * sample["elapsed_s"], 0.001):
                    return None
                lags.append(lag)
        return max(lags)

    def socat_pair(self, size: int) -> tuple[float | None, float | None]:
        """(ours, socat) ns/op at ``size``: ours from the runs interleaved with socat's when the
        run has them (older results: the TCP row's own figure)."""
        socat = self.get("tcp", size, False, "socat")
        if socat is None or not socat.get("median_ns_per_op"):
            return None, None
        paired = socat.get("paired") or {}
        ours = paired.get("median_ns_per_op") or self.ns("tcp", size, False, "trio_gateway")
        return (float(ours) if ours else None), float(socat["median_ns_per_op"])

    def parallels(self, row: str) -> list[bool]:
        found = {key[2] for key in self.by_key if key[0] == row}
        return [p for p in (False, True) if p in found]

    def has(self, row: str) -> bool:
        return any(key[0] == row for key in self.by_key)


def _ns(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cell(res: Results, row: str, size: int, parallel: bool, impl: str = "trio_gateway") -> str:
    result = res.get(row, size, parallel, impl)
    if result is None:
        return "-"
    if result["status"] == "n/a":
        return "N/A"
    value = res.ns(row, size, parallel, impl)
    if value is None:
        return f"{result['status']}"
    text = _ns(value)
    if impl == "trio_gateway":
        ratio = res.ratio(row, size, parallel, PEERS.get(row, "asyncio"))
        if ratio is not None:
            text += f" ({ratio:.2f}x)"
    if row == "udp" and result.get("median_loss") is not None:
        text += f", {result['median_loss']:.1%} lost"
    return text


def _size_header(sizes: Sequence[int]) -> str:
    return " | ".join(f"{SIZE_NAMES.get(s, '')} ({s} B)" for s in sizes)


def transports_table(res: Results) -> str:
    sizes = res.sizes
    lines = [
        f"| Protocol | Parallel sending | {_size_header(sizes)} |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for row in TABLE_ROWS:
        if not res.has(row):
            continue
        for parallel in res.parallels(row):
            cells = " | ".join(_cell(res, row, s, parallel) for s in sizes)
            lines.append(f"| {res.titles[row]} | {'Yes' if parallel else 'No'} | {cells} |")
    return "\n".join(lines)


def peers_table(res: Results) -> str:
    sizes = res.sizes
    lines = [
        f"| Protocol | peer | Parallel sending | {_size_header(sizes)} |",
        "|---|---|---|" + "---:|" * len(sizes),
    ]
    for row in TABLE_ROWS:
        if not res.has(row):
            continue
        impls = [
            i
            for i in res.impls[row]
            if i != "trio_gateway" and any(k[0] == row and k[3] == i for k in res.by_key)
        ]
        for impl in impls:
            name = res.name(row, impl)
            for parallel in res.parallels(row):
                cells = " | ".join(_cell(res, row, s, parallel, impl) for s in sizes)
                lines.append(
                    f"| {res.titles[row]} | {name} | {'Yes' if parallel else 'No'} | {cells} |"
                )
    return "\n".join(lines)


def cpu_table(res: Results) -> str:
    sizes = res.sizes
    lines = [
        f"| Protocol | Parallel sending | {_size_header(sizes)} |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for row in (*TABLE_ROWS, "tcp-file"):
        if not res.has(row):
            continue
        other = PEERS.get(row, "asyncio")
        for parallel in res.parallels(row):
            cells = []
            for size in sizes:
                ours = res.ns(row, size, parallel, "trio_gateway", cpu=True)
                ratio = res.ratio(row, size, parallel, other, cpu=True)
                client = res.client_cpu(row, size, parallel, "trio_gateway")
                cells.append(
                    "N/A"
                    if ours is None and row == "udp" and size > 65507
                    else f"{_ns(ours)} ({_x(ratio)}); {_ns(client)}"
                    if ours
                    else "-"
                )
            lines.append(
                f"| {res.titles[row]} | {'Yes' if parallel else 'No'} | {' | '.join(cells)} |"
            )
    return "\n".join(lines)


def wire_table(res: Results) -> str:
    """The wire rows: every server of a case, its ns/op and server CPU beside ours, and the
    client's CPU, so that a reader sees whether the client limited the run."""
    lines = [
        "| Protocol | In flight | Size (B) | Server | ns/op | its ns / ours | server CPU ns/op "
        "| its CPU / ours | client CPU ns/op |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in WIRE_ROWS:
        if not res.has(row):
            continue
        sizes = sorted({key[1] for key in res.by_key if key[0] == row})
        for parallel in res.parallels(row):
            for size in sizes:
                for impl in res.impls[row]:
                    result = res.get(row, size, parallel, impl)
                    if result is None:
                        continue
                    wall = res.ns(row, size, parallel, impl)
                    if wall is None:
                        lines.append(
                            f"| {res.titles[row]} | {result.get('inflight', 1)} | {size} | "
                            f"{res.name(row, impl)} | {result['status']} | | | | |"
                        )
                        continue
                    cpu = res.ns(row, size, parallel, impl, cpu=True)
                    client = res.client_cpu(row, size, parallel, impl)
                    ours = impl == "trio_gateway"
                    ratio = "" if ours else _x(res.ratio(row, size, parallel, impl))
                    cpu_ratio = "" if ours else _x(res.ratio(row, size, parallel, impl, cpu=True))
                    bound = " (client-bound)" if client and client >= 0.8 * wall else ""
                    name = "**trio_gateway**" if ours else res.name(row, impl)
                    lines.append(
                        f"| {res.titles[row]} | {result.get('inflight', 1)} | {size} | {name} | "
                        f"{_ns(wall)} | {ratio} | {_ns(cpu)} | {cpu_ratio} | "
                        f"{_ns(client)}{bound} |"
                    )
    return "\n".join(lines)


def extras_table(res: Results) -> str:
    lines = [
        "| case | size | trio_gateway ns/op | the other | its ns/op | ratio | note |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for size in res.sizes:
        ours, socat = res.socat_pair(size)
        if socat is not None:
            lines.append(
                f"| Streaming TCP, 1 connection | {size} | {_ns(ours)} | socat -u (C reader, "
                f"no queue) | {_ns(socat)} | {_x(socat / ours if ours else None)} | "
                f"raw read: bytes to /dev/null |"
            )
    for parallel in res.parallels("udp"):
        for size in res.sizes:
            if size > 65507:
                continue
            ours = res.get("udp", size, parallel, "trio_gateway")
            uv = res.get("udp", size, parallel, "uvloop")
            if ours is None or uv is None:
                continue
            note = _udp_note(res, size, parallel, ours, uv)
            lines.append(
                f"| UDP, {'parallel' if parallel else '1 sender'} | {size} | "
                f"{_ns(res.ns('udp', size, parallel, 'trio_gateway'))} | uvloop DatagramProtocol "
                f"| {_ns(res.ns('udp', size, parallel, 'uvloop'))} | "
                f"{_x(res.ratio('udp', size, parallel, 'uvloop'))} | {note} |"
            )
    for parallel in res.parallels("tcp-file"):
        for size in res.sizes:
            ours = res.get("tcp-file", size, parallel, "trio_gateway")
            peer = res.get("tcp-file", size, parallel, "asyncio")
            if ours is None or peer is None:
                continue
            note = "records written; bytes/record: ours %s, peer %s" % (
                ours.get("file_bytes_per_record", "-"),
                peer.get("file_bytes_per_record", "-"),
            )
            lines.append(
                f"| TCP into the file sink (JSONL), {'parallel' if parallel else '1 connection'} "
                f"| {size} | {_ns(res.ns('tcp-file', size, parallel, 'trio_gateway'))} | asyncio "
                f"Protocol + JSONL writer | {_ns(res.ns('tcp-file', size, parallel, 'asyncio'))} | "
                f"{_x(res.ratio('tcp-file', size, parallel, 'asyncio'))} | {note} |"
            )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def jsonl_table(document: dict[str, Any]) -> str:
    jsonl = document.get("jsonl", {})
    if jsonl.get("status") != "ok":
        return f"(not measured: {jsonl.get('status', 'absent')})"
    lines = [
        "| size (B) | record (B) | trio_gateway ns/record | reference ns/record | speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in jsonl["results"]:
        lines.append(
            f"| {row['size']} | {row['record_bytes']:,.0f} | {_ns(row['trio_gateway_ns'])} | "
            f"{_ns(row['reference_ns'])} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def queue_tables(document: dict[str, Any]) -> str:
    queues = document.get("queues", {})
    if queues.get("status") != "ok":
        return f"(not measured: {queues.get('status', 'absent')})"
    values = {(r["queue"], r["mode"], r["size"]): r["ns_per_message"] for r in queues["results"]}
    sizes = sorted({r["size"] for r in queues["results"]})
    out = []
    titles = {
        "sync": "put_nowait + get_nowait, one message at a time (the talk's Enqueue + Dequeue)",
        "await": "await put + await get per message (two Trio checkpoints)",
        "batched": f"put_many_nowait + await get_batch, {queues.get('batch', 256)} at a time",
    }
    for mode in ("sync", "await", "batched"):
        out.append(f"**{mode}**: {titles[mode]}; ns per message, and the ratio to the deque\n")
        out.append(f"| Data structure | {_size_header(sizes)} |")
        out.append("|---|" + "---:|" * len(sizes))
        for key, name, _ in QUEUE_ROWS:
            cells = []
            for size in sizes:
                ns = values.get((key, mode, size))
                floor = values.get(("deque", mode, size))
                ratio = f" ({ns / floor:.1f}x)" if ns and floor and key != "deque" else ""
                cells.append(f"{_ns(ns)}{ratio}")
            out.append(f"| {name} | {' | '.join(cells)} |")
        out.append("")
    return "\n".join(out).rstrip()


def go_tables() -> str:
    lines = [
        f"| Protocol | Parallel sending | {_size_header(SIZES)} |",
        "|---|---|" + "---:|" * len(SIZES),
    ]
    for name, by_parallel in GO_TRANSPORTS.items():
        for parallel, values in by_parallel.items():
            cells = " | ".join("-" if v is None else f"{v:,}" for v in values)
            mark = " (*)" if name == "Unary HTTP" and parallel else ""
            lines.append(f"| {name} | {'Yes' if parallel else 'No'}{mark} | {cells} |")
    lines += ["", f"| Data structure | {_size_header(SIZES)} |", "|---|" + "---:|" * len(SIZES)]
    for name, values in GO_QUEUES.items():
        lines.append(f"| {name} | {' | '.join(f'{v:,}' for v in values)} |")
    return "\n".join(lines)


def machine_block(document: dict[str, Any]) -> str:
    machine = document["machine"]
    load = document["load"]
    settings = document["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    mode = document["mode"]
    warning = (
        ""
        if mode == "full"
        else (
            f"\n\n**This is a `--{mode}` run: short runs, one repeat. Do not quote its figures.**"
        )
    )
    spreads = [
        (r["spread"], f"{r['row']} {r['size']} B {r['impl']}{' parallel' if r['parallel'] else ''}")
        for r in document["results"]
        if r.get("spread") is not None and len(r["samples"]) > 1
    ]
    spread = ""
    if spreads:
        middle = sorted(value for value, _ in spreads)[len(spreads) // 2]
        widest = max(spreads)
        spread = (
            f"\n- **Spread** of a cell's runs ((max - min) / 2 / median): median {middle:.1%}, "
            f"widest {widest[0]:.1%} ({widest[1]})."
        )
    return (
        f"- **Date**: {document['date']} (UTC); `python -m bench` in mode `{mode}`, "
        f"{document['elapsed_s']:.0f} s.\n"
        f"- **Machine**: {machine['cpu']}, {machine['cores']} cores, {machine['system']}, "
        f"Python {machine['python']}.\n"
        f"- **Libraries**: {versions}.\n"
        f"- **Load** (1-minute load average, sampled during the run): start {load['start']}, "
        f"median {load['median']}, max {load['max']}, end {load['end']}. The machine's 2 "
        f"cores are shared with other work; the ratios (ours and the peer measured in the same "
        f"run, repeat by repeat) are what to quote, not the absolute figures.\n"
        f"- **Runs**: {settings['repeats']} measured runs per cell after a warm-up, each sized "
        f"to about {settings['target_seconds']} s; the median is shown (all samples and the "
        f"spread are in the JSON). Parallel sending = {settings['parallel_connections']} "
        f"client connections, one per client process." + spread + warning
    )


def summary_block(res: Results, document: dict[str, Any]) -> str:
    """The figures the prose talks about, computed from this run."""
    items = []

    def both(a: tuple[str, int, bool], b: tuple[str, int, bool]) -> float | None:
        x = res.ns(*a, "trio_gateway")
        y = res.ns(*b, "trio_gateway")
        return x / y if x and y else None

    for parallel in (False, True):
        http_tcp = both(("http", 18, parallel), ("tcp", 18, parallel))
        grpc = both(("grpc-unary", 18, parallel), ("grpc-frames", 18, parallel))
        if http_tcp and grpc:
            items.append(
                f"Streaming vs unary, 18 B, {'parallel' if parallel else 'one connection'}: a "
                f"unary HTTP request costs {http_tcp:,.0f}x a streamed TCP message; a unary gRPC "
                f"call {grpc:,.0f}x a message on a gRPC stream."
            )
    queues = document.get("queues", {})
    if queues.get("status") == "ok":
        values = {
            (r["queue"], r["mode"], r["size"]): r["ns_per_message"] for r in queues["results"]
        }
        ring = values.get(("ring", "sync", 18))
        locked = values.get(("locked_ring", "sync", 18))
        if ring and locked:
            items.append(
                f"Ring buffer vs the same ring with a lock, 18 B, one message at a time: "
                f"{ring:,.0f} ns vs {locked:,.0f} ns per put + get ({locked / ring:.1f}x)."
            )
    tcp = res.ns("tcp", 18, False, "trio_gateway")
    cpu = res.ns("tcp", 18, False, "trio_gateway", cpu=True)
    if tcp and cpu:
        items.append(
            f"Streaming TCP, 18 B, one connection: {tcp:,.0f} ns per message wall clock, of "
            f"which the server spends {cpu:,.0f} ns of CPU (read, split, enqueue, pump, sink)."
        )
    return "\n".join(f"- {item}" for item in items) or "- (not enough rows measured)"


def _udp_note(
    res: Results, size: int, parallel: bool, ours: dict[str, Any], uv: dict[str, Any]
) -> str:
    note = f"lost: ours {_pct(ours.get('median_loss'))}, uvloop {_pct(uv.get('median_loss'))}"
    lag = res.sender_bound("udp", size, parallel, ("trio_gateway", "uvloop"))
    if lag is not None:
        note += (
            f"; sender-bound: both servers had every datagram within {lag * 1e3:.1f} ms of the "
            f"last one sent, in every run, so the ratio is the sender's pace from run to run"
        )
    return note


def targets(res: Results) -> list[dict[str, Any]]:
    """The optimisation targets, evaluated on this run."""
    found: list[dict[str, Any]] = []

    def add(
        name: str, value: float | None, goal: float, extra: bool = True, note: str = ""
    ) -> None:
        met = value is not None and value >= goal and extra
        found.append({"target": name, "value": value, "goal": goal, "met": met, "note": note})

    ours, socat = res.socat_pair(79435)
    if socat is not None:
        add(
            "Streaming TCP 79,435 B vs socat's raw read (interleaved runs)",
            socat / ours if ours else None,
            0.6,
        )
    for parallel in res.parallels("udp"):
        ours = res.get("udp", 18, parallel, "trio_gateway")
        uv = res.get("udp", 18, parallel, "uvloop")
        if ours and uv:
            lost = (ours.get("median_loss") or 0.0) <= (uv.get("median_loss") or 0.0) + 1e-9
            add(
                f"UDP 18 B vs uvloop ({'parallel' if parallel else '1 sender'}), no more loss",
                res.ratio("udp", 18, parallel, "uvloop"),
                1.0,
                lost,
                _udp_note(res, 18, parallel, ours, uv),
            )
    for parallel in res.parallels("tcp-file"):
        for size in res.sizes:
            add(
                f"TCP into the file sink (JSONL) vs the asyncio peer, {size} B",
                res.ratio("tcp-file", size, parallel, "asyncio"),
                1.0,
            )
    goals = {"http": 1.0, "grpc-unary": 1.0, "grpc-stream": 1.5, "ws": 1.0, "tcp": 1.0}
    for row, goal in goals.items():
        for parallel in res.parallels(row):
            for size in res.sizes:
                if goal > 1.0 and size > 4266:
                    continue
                add(
                    f"{res.titles[row]} vs {res.peers[row]}, {size} B, "
                    f"{'parallel' if parallel else '1 connection'}",
                    res.ratio(row, size, parallel, "asyncio"),
                    1.5 if row == "tcp" and size == 18 else goal,
                )
    # Issue 15: the clients people use.
    for parallel in res.parallels("grpc-frames"):
        shape = "parallel" if parallel else "1 connection"
        cpu = res.ns("grpc-frames", 18, parallel, "trio_gateway", cpu=True)
        add(
            f"Streaming gRPC, one DATA frame per message, 18 B, {shape}: server CPU <= 4 us a "
            "message (4 us / ours)",
            4000 / cpu if cpu else None,
            1.0,
            note=f"server CPU {_ns(cpu)} ns a message",
        )
        for impl, goal in (("grpcio", 1.0), ("asyncio", 4.0)):
            add(
                f"Streaming gRPC, one DATA frame per message, 18 B, {shape}, vs "
                f"{res.name('grpc-frames', impl)}",
                res.ratio("grpc-frames", 18, parallel, impl),
                goal,
            )
    wire_goals = (
        ("grpc-send", "grpcio", 1.0),
        ("grpc-make", "grpcio", 1.0),
        ("http-wire", "uvicorn-httptools", 1.0),
        ("h2c", "asyncio", 1.5),
    )
    for row, impl, goal in wire_goals:
        for parallel in res.parallels(row):
            result = res.get(row, 18, parallel, "trio_gateway")
            if result is None:
                continue
            add(
                f"{res.titles[row]}, 18 B, {result.get('inflight', 1)} in flight, vs "
                f"{res.name(row, impl)}",
                res.ratio(row, 18, parallel, impl),
                goal,
                note=f"server CPU ratio {_x(res.ratio(row, 18, parallel, impl, cpu=True))}",
            )
    return found


def targets_block(found: list[dict[str, Any]]) -> str:
    lines = ["| target | goal | this run | met |", "|---|---:|---:|:---:|"]
    for t in found:
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(
            f"| {t['target']}{note} | >= {t['goal']:.1f}x | {_x(t['value'])} | "
            f"{'yes' if t['met'] else '**no**'} |"
        )
    return "\n".join(lines)


# -- charts ---------------------------------------------------------------------------------


def charts(res: Results, document: dict[str, Any], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    img.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = [r for r in TABLE_ROWS if res.has(r)]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2"]
    labels = [res.titles[r].replace("Streaming ", "Str. ") for r in rows]
    parallels = [p for p in (False, True) if any(p in res.parallels(r) for r in rows)]

    def grouped(ax: Any, values: dict[int, list[float | None]], base: float | None) -> None:
        """Bars per row and size on a log axis; with ``base``, bars grow from it (ratios)."""
        width = 0.8 / max(1, len(res.sizes))
        for i, size in enumerate(res.sizes):
            xs = [j + (i - (len(res.sizes) - 1) / 2) * width for j in range(len(rows))]
            if base is None:
                ys = [v or 0.0 for v in values[size]]
                ax.bar(xs, ys, width, label=f"{size} B", color=colors[i % len(colors)])
            else:
                ys = [(v - base) if v else 0.0 for v in values[size]]
                ax.bar(xs, ys, width, bottom=base, label=f"{size} B", color=colors[i % len(colors)])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7, rotation=20)
        ax.set_yscale("log", base=10 if base is None else 2)
        if base is not None:
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(img / name, dpi=80)
        plt.close(fig)
        written.append(img / name)

    def per_parallel(
        name: str,
        value: Callable[[str, int, bool], float | None],
        base: float | None,
        title: str,
        ylabel: str,
    ) -> None:
        """One panel per parallel setting, a group of bars per table row."""
        fig, axes = plt.subplots(1, len(parallels), figsize=(9, 3.4), sharey=True, squeeze=False)
        for ax, parallel in zip(axes[0], parallels, strict=True):
            grouped(ax, {s: [value(r, s, parallel) for r in rows] for s in res.sizes}, base)
            if base is not None:
                ax.axhline(base, color="black", linewidth=0.8)
            ax.set_title(title.format(yes="yes" if parallel else "no"), fontsize=9)
        axes[0][0].set_ylabel(ylabel, fontsize=8)
        axes[0][-1].legend(fontsize=7)
        save(fig, name)

    # 1. ns/op per transport and size; 2. ours vs the asyncio peer. A run of other rows only
    # (``--only http-wire``) has no column for these two: no chart then (its subplots would
    # have no panel), and none left from an earlier run into the same directory.
    if rows:
        per_parallel(
            "bench-transports.png",
            lambda r, s, p: res.ns(r, s, p, "trio_gateway"),
            None,
            "trio_gateway, parallel sending: {yes}",
            "ns per message (log)",
        )
        per_parallel(
            "bench-vs-asyncio.png",
            lambda r, s, p: res.ratio(r, s, p, PEERS.get(r, "asyncio")),
            1.0,
            "asyncio peer ns / trio_gateway ns, parallel: {yes}",
            "speed-up (> 1x: trio_gateway is faster)",
        )
    else:
        for name in ("bench-transports.png", "bench-vs-asyncio.png"):
            (img / name).unlink(missing_ok=True)

    # 3. the wire rows: every peer against ours, at the smallest size
    wire = [(r, p) for r in WIRE_ROWS if res.has(r) for p in res.parallels(r)]
    if wire:
        size = min(key[1] for key in res.by_key if key[0] in WIRE_ROWS)
        fig, ax = plt.subplots(figsize=(9, 3.4))
        peers = sorted(
            {i for r, _ in wire for i in res.impls[r] if i != "trio_gateway"},
            key=lambda i: (
                ("asyncio", "grpcio", "uvicorn-httptools", "uvicorn-h11").index(i)
                if i in ("asyncio", "grpcio", "uvicorn-httptools", "uvicorn-h11")
                else 9
            ),
        )
        width = 0.8 / max(1, len(peers))
        for i, impl in enumerate(peers):
            xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(wire))]
            ys = [(res.ratio(r, size, p, impl) or 1.0) - 1.0 for r, p in wire]
            label = "hypercorn / grpclib (asyncio)" if impl == "asyncio" else impl
            ax.bar(xs, ys, width, bottom=1.0, label=label, color=colors[i % len(colors)])
        ax.set_xticks(range(len(wire)))
        short = {"grpc-send": "gRPC Send", "grpc-make": "MakeRequest"}
        short |= {"http-wire": "HTTP/1.1", "h2c": "h2c"}
        ax.set_xticklabels(
            [
                f"{short.get(r, r)}\n"
                f"{(res.get(r, size, p, 'trio_gateway') or {}).get('inflight', 1)} in flight"
                for r, p in wire
            ],
            fontsize=7,
        )
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(
            f"the peer's ns / trio_gateway's, {size} B (> 1x: trio_gateway is faster)", fontsize=9
        )
        ax.legend(fontsize=7)
        save(fig, "bench-wire.png")
    else:
        (img / "bench-wire.png").unlink(missing_ok=True)

    # 4. queues
    queues = document.get("queues", {})
    if queues.get("status") == "ok":
        values_q = {
            (r["queue"], r["mode"], r["size"]): r["ns_per_message"] for r in queues["results"]
        }
        sizes = sorted({r["size"] for r in queues["results"]})
        modes = ["sync", "batched"]
        fig, axes = plt.subplots(1, len(modes), figsize=(9, 3.2), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            width = 0.8 / len(sizes)
            for i, size in enumerate(sizes):
                xs = [j + (i - (len(sizes) - 1) / 2) * width for j in range(len(QUEUE_ROWS))]
                ys = [values_q.get((key, mode, size)) or 0 for key, _, _ in QUEUE_ROWS]
                ax.bar(xs, ys, width, label=f"{size} B", color=colors[i % len(colors)])
            ax.set_xticks(range(len(QUEUE_ROWS)))
            ax.set_xticklabels([key for key, _, _ in QUEUE_ROWS], fontsize=7)
            ax.set_title(f"queues, {mode}: ns per put + get", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        save(fig, "bench-queues.png")
    else:
        (img / "bench-queues.png").unlink(missing_ok=True)
    return written


# -- the page -------------------------------------------------------------------------------

SKELETON = """# Benchmarks

Generated by `python -m bench`. This page had no prose when it was generated; the repository's
docs/benchmarks.md has it.

<!-- bench:machine -->
<!-- /bench:machine -->

<!-- bench:summary -->
<!-- /bench:summary -->

<!-- bench:transports -->
<!-- /bench:transports -->

<!-- bench:peers -->
<!-- /bench:peers -->

<!-- bench:cpu -->
<!-- /bench:cpu -->

<!-- bench:wire -->
<!-- /bench:wire -->

<!-- bench:extras -->
<!-- /bench:extras -->

<!-- bench:jsonl -->
<!-- /bench:jsonl -->

<!-- bench:targets -->
<!-- /bench:targets -->

<!-- bench:queues -->
<!-- /bench:queues -->

<!-- bench:go -->
<!-- /bench:go -->
"""


def fill(page: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pattern = re.compile(
            rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S
        )
        if not pattern.search(page):
            page = page.rstrip("\n") + f"\n\n<!-- bench:{name} -->\n<!-- /bench:{name} -->\n"
        page = pattern.sub(lambda m, body=body: m[1] + body.rstrip("\n") + "\n" + m[2], page)
    return page


def write_outputs(document: dict[str, Any], out: Path) -> list[Path]:
    res = Results(document)
    found = targets(res)
    document["targets"] = found
    results_dir = out / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{document['date'][:10]}.json"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    written = [json_path]
    written += charts(res, document, out / "docs" / "img")
    page_path = out / "docs" / "benchmarks.md"
    if page_path.exists():
        page = page_path.read_text()
    elif (ROOT / "docs" / "benchmarks.md").exists():
        page = (ROOT / "docs" / "benchmarks.md").read_text()
    else:
        page = SKELETON
    blocks = {
        "machine": machine_block(document),
        "summary": summary_block(res, document),
        "transports": transports_table(res),
        "peers": peers_table(res),
        "cpu": cpu_table(res),
        "wire": wire_table(res),
        "extras": extras_table(res),
        "jsonl": jsonl_table(document),
        "targets": targets_block(found),
        "queues": queue_tables(document),
        "go": go_tables(),
    }
    page_path.parent.mkdir(parents=True, exist_ok=True)
    page_path.write_text(fill(page, blocks))
    written.append(page_path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text())
    for path in write_outputs(document, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
