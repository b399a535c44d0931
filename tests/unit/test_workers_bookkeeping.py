"""Worker bookkeeping without processes: config and flags, metrics over workers, restart policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ROUTED_PIPELINES

from trio_gateway._cli import main
from trio_gateway._config import GatewayConfig, SourceConfig, load_config
from trio_gateway.workers import RestartPolicy
from trio_gateway.workers._metrics import MetricsAggregate, ledger_from_samples
from trio_gateway.workers._pipes import Lines as _Lines
from trio_gateway.workers._spec import config_from_jsonable, config_to_jsonable


def test_workers_in_config_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nworkers = 3\n[[sources]]\ntransport = "tcp"\n')
    assert load_config(str(config)).workers == 3
    assert main(["check-config", str(config)]) == 0
    assert "workers: 3" in capsys.readouterr().out
    config.write_text("[gateway]\nworkers = 0\n")
    assert main(["check-config", str(config)]) == 2
    assert "gateway.workers: must be at least 1" in capsys.readouterr().err
    profile = str(tmp_path / "p.prof")
    assert main(["serve", "--workers", "2", "--tcp", "127.0.0.1:0", "--profile", profile]) == 2
    assert "--profile" in capsys.readouterr().err


def _exposition(received: int, depth: int, cpu: float) -> str:
    return (
        "# HELP trio_gateway_received_messages_total Messages.\n"
        "# TYPE trio_gateway_received_messages_total counter\n"
        f'trio_gateway_received_messages_total{{transport="tcp",listener="tcp:x"}} {received}\n'
        "# HELP trio_gateway_delivered_messages_total Delivered.\n"
        "# TYPE trio_gateway_delivered_messages_total counter\n"
        f"trio_gateway_delivered_messages_total {received - depth}\n"
        "# HELP trio_gateway_queue_depth Depth.\n"
        "# TYPE trio_gateway_queue_depth gauge\n"
        f'trio_gateway_queue_depth{{queue="ring"}} {depth}\n'
        "# HELP trio_gateway_sink_batch_seconds Latency.\n"
        "# TYPE trio_gateway_sink_batch_seconds histogram\n"
        'trio_gateway_sink_batch_seconds_bucket{sink="null",le="0.1"} 1\n'
        'trio_gateway_sink_batch_seconds_bucket{sink="null",le="+Inf"} 2\n'
        'trio_gateway_sink_batch_seconds_count{sink="null"} 2\n'
        'trio_gateway_sink_batch_seconds_sum{sink="null"} 0.5\n'
        "# HELP process_cpu_seconds_total CPU.\n"
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {cpu}\n"
    )


def test_metrics_sum_over_workers_and_survive_a_restart() -> None:
    book = MetricsAggregate()
    zero = book.parse(0, _exposition(received=100, depth=10, cpu=1.5))
    one = book.parse(1, _exposition(received=50, depth=5, cpu=2.0))
    totals = book.combine({0: zero, 1: one})
    key = ("trio_gateway_received_messages_total", (("listener", "tcp:x"), ("transport", "tcp")))
    assert totals["trio_gateway_received_messages"][key] == 150
    assert (
        totals["trio_gateway_queue_depth"][("trio_gateway_queue_depth", (("queue", "ring"),))] == 15
    )
    bucket = ("trio_gateway_sink_batch_seconds_bucket", (("le", "+Inf"), ("sink", "null")))
    assert totals["trio_gateway_sink_batch_seconds"][bucket] == 4
    cpu = totals["process_cpu_seconds"]  # per process, not summed
    assert cpu == {
        ("process_cpu_seconds_total", (("worker", "0"),)): 1.5,
        ("process_cpu_seconds_total", (("worker", "1"),)): 2.0,
    }

    # Worker 0 dies; its successor starts from zero. Counters keep what it had, gauges do not.
    book.retire(0, zero)
    successor = book.parse(0, _exposition(received=7, depth=0, cpu=0.1))
    totals = book.combine({0: successor, 1: one})
    assert totals["trio_gateway_received_messages"][key] == 157
    assert (
        totals["trio_gateway_queue_depth"][("trio_gateway_queue_depth", (("queue", "ring"),))] == 5
    )
    assert totals["trio_gateway_sink_batch_seconds"][bucket] == 6
    assert book.worker_total(0, successor, "trio_gateway_received_messages") == 107
    names = [m.name for m in book.metrics({0: successor, 1: one})]
    assert names.count("trio_gateway_received_messages") == 1


def test_ledger_of_a_worker_that_left_none_comes_from_its_metrics() -> None:
    book = MetricsAggregate()
    ledger = ledger_from_samples(book.parse(0, _exposition(received=100, depth=10, cpu=1)))
    assert (ledger.received, ledger.delivered, ledger.abandoned) == (100, 90, 10)
    assert ledger.balanced


def test_stderr_lines_are_bounded() -> None:
    lines = _Lines(limit=10)
    assert lines.feed(b"one\ntw") == [b"one"]
    assert lines.feed(b"o\n" + b"x" * 20) == [b"two", b"x" * 10 + b" [line cut]"]
    assert lines.feed(b"yyy\nthree") == []  # the rest of the cut line is dropped
    assert lines.close() == [b"three"]


def test_restart_backoff_and_config_round_trip() -> None:
    policy = RestartPolicy(initial=0.5, maximum=3.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    config = GatewayConfig(
        sources=(SourceConfig("tcp", "127.0.0.1", 7000, {"framing": "length"}, key="--tcp"),),
        workers=4,
        processor="mod:fn",
    )
    assert config_from_jsonable(json.loads(json.dumps(config_to_jsonable(config)))) == config


PIPELINES = "[gateway]\nworkers = 2\n" + ROUTED_PIPELINES.format(
    all="a.jsonl", alerts="b.jsonl"
).replace('routes = ["error"]', 'routes = ["error"]\nqueue = { capacity = 5000 }')


def test_named_pipelines_go_to_the_workers_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pipelines.toml"
    config.write_text(PIPELINES)
    read = load_config(str(config))
    assert read.pipelines[0].sink_queues[1] is not None
    # Through the spec's JSON line and back: each sink's own queue and routes included.
    assert config_from_jsonable(json.loads(json.dumps(config_to_jsonable(read)))) == read
    assert main(["check-config", str(config)]) == 0
    assert "workers: 2 (each runs every pipeline)" in capsys.readouterr().out
    disk = PIPELINES.replace(
        "[pipelines.alerts]\n",
        f'[pipelines.alerts]\nqueue = {{ kind = "disk", dir = "{tmp_path}" }}\n',
    )
    config.write_text(disk)
    assert main(["check-config", str(config)]) == 2
    assert "pipelines.alerts.queue.kind: the disk queue serves one process" in (
        capsys.readouterr().err
    )


def test_each_pipelines_reports_add_up_over_the_workers() -> None:
    from trio_gateway.workers._ledgers import sum_reports

    one = {
        "received": 3,
        "dropped": {"filtered": 1},
        "balanced": True,
        "sinks": {"null": {"accepted": 2, "queued": 0}},
        "routed_out": {"alerts": 2},
    }
    two = {
        "received": 4,
        "dropped": {"filtered": 0, "refused": 2},
        "balanced": True,
        "sinks": {"null": {"accepted": 5, "abandoned": 1}},
        "routed_out": {"alerts": 1},
    }
    assert sum_reports([one, two]) == {
        "received": 7,
        "dropped": {"filtered": 1, "refused": 2},
        "balanced": True,
        "sinks": {"null": {"accepted": 7, "queued": 0, "abandoned": 1}},
        "routed_out": {"alerts": 3},
    }
    assert sum_reports([one, {**two, "balanced": False}])["balanced"] is False
