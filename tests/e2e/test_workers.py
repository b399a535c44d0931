"""serve --workers N: shared ports (SO_REUSEPORT), restarts, signals, combined ledger, metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from helpers import REPO, ROUTED_PIPELINES, ServeProcess, read_payloads, wait_until_sync
from prometheus_client.parser import text_string_to_metric_families

from trio_gateway._config import GatewayConfig, SinkConfig, SourceConfig
from trio_gateway.workers import RestartPolicy, Supervisor, WorkerError

# -- helpers ----------------------------------------------------------------------------------


def admin_port(process: ServeProcess) -> int:
    for line in process.stderr_lines:
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics \(all workers\)", line)
        if match:
            return int(match[1])
    raise AssertionError("no admin line: " + "".join(process.stderr_lines))


def worker_pids(process: ServeProcess) -> dict[int, int]:
    pids = {}
    for line in process.stderr_lines:
        match = re.search(r"worker (\d+) started: pid (\d+)", line)
        if match:
            pids[int(match[1])] = int(match[2])
    return pids


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def per_worker(samples: dict[tuple[str, Any], float], name: str) -> dict[str, float]:
    return {dict(labels)["worker"]: v for (n, labels), v in samples.items() if n == name}


def ledger_of(stderr: str) -> dict[str, Any]:
    lines = [ln for ln in stderr.splitlines() if ln.startswith('{"ledger"')]
    assert len(lines) == 1, stderr
    ledger: dict[str, Any] = json.loads(lines[0])["ledger"]
    return ledger


def send_tcp(port: int, payloads: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"".join(p + b"\n" for p in payloads))
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the gateway closes once it has read everything


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


# -- the command, end to end ------------------------------------------------------------------


def test_two_workers_share_tcp_udp_and_http_ports(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    out = tmp_path / "out.jsonl"
    args = ["--workers", "2", "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0"]
    args += ["--http", "127.0.0.1:0", "--sink", f"file:{out}", "--admin", "127.0.0.1:0"]
    gateway = serve(args)
    admin = admin_port(gateway)
    sent: list[bytes] = []
    for conn in range(16):  # every connection has its own source port: the kernel spreads them
        batch = [b"tcp-%d-%d" % (conn, i) for i in range(250)]
        send_tcp(gateway.port("tcp"), batch)
        sent += batch
    for sender in range(16):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(25):
                payload = b"udp-%d-%d" % (sender, i)
                sock.sendto(payload, ("127.0.0.1", gateway.port("udp")))
                sent.append(payload)
    with httpx.Client(trust_env=False) as client:
        for i in range(10):
            reply = client.post(
                f"http://127.0.0.1:{gateway.port('http')}/ingest", content=b"http-%d" % i
            )
            assert reply.status_code == 202
            sent.append(b"http-%d" % i)

    # Both workers append to one file (O_APPEND, one write per batch): every line whole.
    wait_until_sync(lambda: len(read_payloads(out)) >= len(sent), what="every message in the file")
    assert Counter(read_payloads(out)) == Counter(sent)

    def scraped_all() -> bool:
        samples = metrics(admin)
        return total(samples, "trio_gateway_delivered_messages_total") == len(sent)

    wait_until_sync(scraped_all, what="the scrape to catch up")
    samples = metrics(admin)
    received = {
        dict(labels)["transport"]: v
        for (name, labels), v in samples.items()
        if name == "trio_gateway_received_messages_total"
    }
    assert received == {"tcp": 4000, "udp": 400, "http": 10}
    connections = per_worker(samples, "trio_gateway_worker_connections_total")
    assert connections["0"] > 0 and connections["1"] > 0, connections  # both got some
    assert sum(connections.values()) == 17  # 16 TCP + 1 keep-alive HTTP
    assert samples[("trio_gateway_workers", ())] == 2
    assert samples[("trio_gateway_accepting", ())] == 1
    assert {"0", "1", "supervisor"} <= set(per_worker(samples, "process_cpu_seconds_total"))
    ready = httpx.get(f"http://127.0.0.1:{admin}/readyz", trust_env=False)
    assert ready.status_code == 200

    code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "stopping at once" not in stderr  # each worker saw one stop, not two
    ledger = ledger_of(stderr)
    assert ledger["received"] == ledger["delivered"] == len(sent)
    assert ledger["balanced"] is True
    assert (ledger["workers"], ledger["restarts"], ledger["crashed"]) == (2, 0, 0)
    # Each worker ran its own flush and reported its own ledger; they add up.
    own = [json.loads(m) for m in re.findall(r"worker \d ledger: (\{.*\})", stderr)]
    assert len(own) == 2 and sum(w["received"] for w in own) == len(sent)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_counted(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            "--workers",
            "2",
            "--tcp",
            "127.0.0.1:0",
            "--sink",
            f"file:{out}",
            "--admin",
            "127.0.0.1:0",
        ]
    )
    admin, port = admin_port(gateway), gateway.port("tcp")
    first = [b"before-%d-%d" % (c, i) for c in range(8) for i in range(100)]
    for c in range(8):
        send_tcp(port, first[c * 100 : (c + 1) * 100])
    wait_until_sync(lambda: len(read_payloads(out)) == 800, what="the first messages")
    # The ledger of a killed worker comes from the last scrape: let it see everything.
    wait_until_sync(lambda: total(metrics(admin), "trio_gateway_delivered_messages_total") == 800)

    os.kill(worker_pids(gateway)[0], signal.SIGKILL)

    def restarted() -> bool:
        samples = metrics(admin)
        return (
            per_worker(samples, "trio_gateway_worker_restarts_total")["0"] == 1
            and per_worker(samples, "trio_gateway_worker_up")["0"] == 1
        )

    wait_until_sync(restarted, what="worker 0 to be back")
    assert httpx.get(f"http://127.0.0.1:{admin}/readyz", trust_env=False).status_code == 200
    # The killed worker's counters are kept: the sum did not go back.
    assert total(metrics(admin), "trio_gateway_received_messages_total") >= 800

    second = [b"after-%d-%d" % (c, i) for c in range(8) for i in range(100)]
    for c in range(8):
        send_tcp(port, second[c * 100 : (c + 1) * 100])
    wait_until_sync(lambda: len(read_payloads(out)) == 1600, what="the second messages")
    assert Counter(read_payloads(out)) == Counter(first + second)
    wait_until_sync(lambda: total(metrics(admin), "trio_gateway_received_messages_total") == 1600)

    code, stderr = gateway.stop(signal.SIGINT)
    assert code == 0, stderr
    assert "worker 0 (pid" in stderr and "killed by SIGKILL" in stderr
    ledger = ledger_of(stderr)
    assert ledger["received"] == ledger["delivered"] == 1600
    assert (ledger["balanced"], ledger["restarts"], ledger["crashed"]) == (True, 1, 1)


def test_stdout_sink_lines_from_two_workers_never_interleave(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    gateway = serve(
        ["--workers", "2", "--tcp", "127.0.0.1:0", "--sink", "stdout", "--admin", "off"]
    )
    sent = [b"x" * 300 + b"-%d-%d" % (c, i) for c in range(8) for i in range(100)]
    for c in range(8):
        send_tcp(gateway.port("tcp"), sent[c * 100 : (c + 1) * 100])
    gateway.proc.send_signal(signal.SIGTERM)
    stdout, stderr = gateway.proc.communicate(timeout=30)
    assert gateway.proc.returncode == 0, stderr
    lines = stdout.splitlines()
    assert Counter(json.loads(line)["payload"].encode() for line in lines) == Counter(sent)


def test_workers_stop_when_the_parent_is_killed(serve: type[ServeProcess]) -> None:
    gateway = serve(["--workers", "2", "--tcp", "127.0.0.1:0", "--sink", "null", "--admin", "off"])
    pids = list(worker_pids(gateway).values())
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    gateway.proc.kill()
    gateway.proc.communicate()
    # Their stdin (a pipe from the parent) reaches EOF: each shuts down cleanly on its own.
    wait_until_sync(lambda: not any(alive(pid) for pid in pids), timeout=20, what="orphan workers")


def test_sigterm_while_the_workers_start_stops_them_cleanly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_gateway", "serve", "--workers", "2",
         "--tcp", "127.0.0.1:0", "--sink", "null", "--admin", "off"],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = ""
    while "worker 1 started" not in seen:
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    proc.send_signal(signal.SIGTERM)  # neither worker has reported ready yet
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, seen + stderr
    assert "stopping at once" not in stderr and "killing" not in stderr
    ledger = ledger_of(stderr)
    assert (ledger["received"], ledger["crashed"], ledger["workers"]) == (0, 0, 2)
    pids = [int(p) for p in re.findall(r"started: pid (\d+)", seen)]
    assert not any(alive(pid) for pid in pids)


def test_a_port_in_use_fails_once_before_any_worker_starts() -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "trio_gateway", "serve", "--workers", "2",
             "--tcp", f"127.0.0.1:{port}", "--sink", "null", "--admin", "off"],
            capture_output=True, text=True, cwd=REPO, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"error: --tcp: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "worker 0 started" not in result.stderr


# -- the supervisor as a library --------------------------------------------------------------


@pytest.mark.slow
async def test_the_supervisor_gives_up_on_a_worker_that_keeps_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A processor module that imports fine here, but kills every worker process at start.
    (tmp_path / "crashy.py").write_text(
        "import os\n"
        "if os.environ.get('TRIO_GATEWAY_WORKER') is not None:\n"
        "    raise SystemExit(3)\n"
        "def keep(message):\n"
        "    return message.payload\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = GatewayConfig(
        sources=(SourceConfig("tcp", "127.0.0.1", 0),),
        sink=SinkConfig("null"),
        processor="crashy:keep",
        admin="off",
    )
    policy = RestartPolicy(initial=0.01, maximum=0.05, max_failures=3, window=60)
    supervisor = Supervisor(config, workers=2, restart=policy)
    with trio.fail_after(30), pytest.raises(WorkerError, match="failed 3 times within 60 s"):
        await supervisor.run()
    assert "exit status 3" in str(supervisor.failure)
    assert supervisor.state == "stopped"
    ledger = supervisor.ledger
    assert ledger.workers == 2 and ledger.restarts >= 2 and ledger.ledger.received == 0


async def test_cancelling_the_supervisor_flushes_every_worker(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    config = GatewayConfig(
        sources=(SourceConfig("tcp", "127.0.0.1", 0),), sink=SinkConfig(f"file:{out}")
    )
    supervisor = Supervisor(config, workers=2)
    sent = [b"m-%d-%d" % (c, i) for c in range(8) for i in range(50)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            [[(host, port)]] = await nursery.start(supervisor.run)
            for c in range(8):
                async with await trio.open_tcp_stream(host, port) as stream:
                    await stream.send_all(b"".join(p + b"\n" for p in sent[c * 50 : c * 50 + 50]))
                    await stream.send_eof()
                    assert await stream.receive_some() == b""  # all read and queued
            nursery.cancel_scope.cancel()  # like Gateway: cancelling still flushes (bounded)
    assert supervisor.state == "stopped"
    ledger = supervisor.ledger
    assert (ledger.ledger.received, ledger.ledger.delivered, ledger.crashed) == (400, 400, 0)
    assert Counter(read_payloads(out)) == Counter(sent)


PIPELINES = (
    '[gateway]\nworkers = 2\n[admin]\nlisten = "127.0.0.1:0"\n'
    + ROUTED_PIPELINES
    + '[pipelines.metrics]\nsources = [{{ transport = "udp", listen = "127.0.0.1:0" }}]\n'
    + 'sinks = [{{ url = "null" }}]\n'
)


@pytest.mark.slow
def test_two_workers_run_the_same_pipelines_and_sum_each_ones_ledger(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    """Every worker runs every pipeline on the shared ports (routes stay inside a worker);
    the parent prints each pipeline's ledger summed over the workers, then the total."""
    everything, alerts = tmp_path / "all.jsonl", tmp_path / "alerts.jsonl"
    config = tmp_path / "pipelines.toml"
    config.write_text(PIPELINES.format(all=everything, alerts=alerts))
    gateway = serve(["--config", str(config)])
    sent: list[bytes] = []
    for conn in range(16):  # the kernel spreads the connections over the two workers
        batch = [b'{"level":"%s","c":%d,"i":%d}' % (b"error" if i % 5 else b"info", conn, i)
                 for i in range(100)]  # fmt: skip
        send_tcp(gateway.port("tcp"), batch)
        sent += batch
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(50):
            sock.sendto(b"m%d" % i, ("127.0.0.1", gateway.port("udp")))
    errors = [p for p in sent if b"error" in p]
    wait_until_sync(lambda: len(read_payloads(alerts)) == len(errors), what="routed errors")

    def delivered() -> dict[str, float]:  # the parent sums the workers' metrics per pipeline
        return {
            dict(labels)["pipeline"]: v
            for (name, labels), v in metrics(admin_port(gateway)).items()
            if name == "trio_gateway_delivered_messages_total"
        }

    wait_until_sync(
        lambda: delivered().get("logs") == len(sent) and delivered()["alerts"] == len(errors),
        what="the scrape to catch up",
    )
    code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert Counter(read_payloads(everything)) == Counter(sent)
    assert Counter(read_payloads(alerts)) == Counter(errors)
    reports = {
        r["pipeline"]: r
        for r in (json.loads(x) for x in stderr.splitlines() if x.startswith('{"pipeline"'))
    }
    assert reports["logs"]["received"] == len(sent) and reports["logs"]["balanced"] is True
    assert reports["logs"]["routed_out"] == {"alerts": len(errors)}
    assert reports["logs"]["sinks"][f"file:{everything}"]["delivered"] == len(sent)
    assert reports["alerts"]["routed_in"] == {"logs": len(errors)}
    assert reports["alerts"]["delivered"] == len(errors)
    assert reports["metrics"]["received"] <= 50  # UDP on loopback: what the kernel kept
    own = [json.loads(m) for m in re.findall(r"worker \d ledger: (\{.*\})", stderr)]
    assert len(own) == 2 and all(w["received"] for w in own), "both workers took connections"
    ledger = ledger_of(stderr)
    assert ledger["balanced"] is True and ledger["workers"] == 2
    assert ledger["received"] == len(sent) + len(errors) + reports["metrics"]["received"]
