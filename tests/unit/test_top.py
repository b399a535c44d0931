"""``top``: frames rendered from two scrapes without a terminal; ``--once`` on a live gateway."""

from __future__ import annotations

import io

import pytest
from helpers import table_rows
from rich.console import Console

from trio_gateway.admin.progress import send_progress
from trio_gateway.admin.top import (
    main,
    parse_metrics,
    render,
    render_text,
)

BEFORE = """\
# TYPE trio_gateway_received_messages_total counter
trio_gateway_received_messages_total{listener="tcp:0.0.0.0:7000",transport="tcp"} 1000
trio_gateway_received_messages_total{listener="tcp:0.0.0.0:7002",transport="tcp"} 0
trio_gateway_received_messages_total{listener="udp:0.0.0.0:7001",transport="udp"} 50
# TYPE trio_gateway_received_bytes_total counter
trio_gateway_received_bytes_total{listener="tcp:0.0.0.0:7000",transport="tcp"} 18000
trio_gateway_received_bytes_total{listener="udp:0.0.0.0:7001",transport="udp"} 900
# TYPE trio_gateway_rejected_messages_total counter
trio_gateway_rejected_messages_total{listener="tcp:0.0.0.0:7000",reason="oversize",\
transport="tcp"} 1
# TYPE trio_gateway_connections_active gauge
trio_gateway_connections_active{listener="tcp:0.0.0.0:7000",transport="tcp"} 3
# TYPE trio_gateway_queue_depth gauge
trio_gateway_queue_depth{queue="ring"} 10
# TYPE trio_gateway_queue_capacity gauge
trio_gateway_queue_capacity{queue="ring"} 1000
# TYPE trio_gateway_dropped_messages_total counter
trio_gateway_dropped_messages_total{reason="drop_newest"} 0
# TYPE trio_gateway_sink_sent_messages_total counter
trio_gateway_sink_sent_messages_total{sink="null"} 990
# TYPE trio_gateway_sink_batches_total counter
trio_gateway_sink_batches_total{sink="null"} 10
# TYPE trio_gateway_sink_batch_seconds histogram
trio_gateway_sink_batch_seconds_bucket{le="0.01",sink="null"} 10
trio_gateway_sink_batch_seconds_bucket{le="+Inf",sink="null"} 10
trio_gateway_sink_batch_seconds_count{sink="null"} 10
trio_gateway_sink_batch_seconds_sum{sink="null"} 0.01
# TYPE trio_gateway_accepting gauge
trio_gateway_accepting 1
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 10
"""

AFTER = (
    BEFORE.replace('transport="tcp"} 1000', 'transport="tcp"} 41000')
    .replace('transport="tcp"} 18000', 'transport="tcp"} 738000')
    .replace('reason="oversize",transport="tcp"} 1', 'reason="oversize",transport="tcp"} 5')
    .replace('queue="ring"} 10\n', 'queue="ring"} 750\n')
    .replace('reason="drop_newest"} 0', 'reason="drop_newest"} 600')
    .replace('sink="null"} 990', 'sink="null"} 40240')
    .replace('_batches_total{sink="null"} 10', '_batches_total{sink="null"} 50')
    .replace('_count{sink="null"} 10', '_count{sink="null"} 50')
    .replace('_sum{sink="null"} 0.01', '_sum{sink="null"} 0.11')
    .replace("trio_gateway_accepting 1", "trio_gateway_accepting 0")
    .replace("process_cpu_seconds_total 10", "process_cpu_seconds_total 11")
)


def test_a_frame_shows_rates_from_two_scrapes() -> None:
    before = parse_metrics(BEFORE, at=100.0)
    after = parse_metrics(AFTER, at=102.0)  # two seconds later
    frame = render_text(before, after, target="gw:9100", width=140)
    table = table_rows(frame)
    # 40,000 TCP messages in 2 s; 720,000 bytes in 2 s; 4 rejected in 2 s.
    assert table["tcp"][:3] == ["20.0k", "360.0kB", "2"]
    assert table["tcp"][3:] == ["41.0k", "5", "3"]
    assert table["udp"][:2] == ["0", "0B"]
    assert table["tcp:0.0.0.0:7000"][0] == "20.0k"
    assert table["tcp:0.0.0.0:7000"][3] == "oversize 5"
    assert table["tcp:0.0.0.0:7002"][0] == "0"
    # Queue: depth over capacity, fill, 300 drops a second, by reason.
    assert table["ring"][0] == "750/1.0k"
    assert "75%" in table["ring"][2]  # after the bar
    assert table["ring"][-2:] == ["300", "drop_newest 600"]
    # Sink: 19,625 msg/s; 39,250 messages in 40 batches = 981 a batch; 0.1 s over 40
    # batches = 2.5 ms per batch. No sink_up gauge in these scrapes: state unknown.
    assert table["null"][:4] == ["-", "19.6k", "981", "2.50"]
    assert "not ready" in frame
    assert "cpu 50%" in frame
    assert "rates over 2.0 s" in frame


def test_the_first_frame_has_totals_but_no_rates() -> None:
    frame = render_text(None, parse_metrics(BEFORE, at=1.0), width=140)
    table = table_rows(frame)
    assert table["tcp"][0] == "-"
    assert table["tcp"][3] == "1.0k"
    assert "rates after 2 scrapes" in frame
    assert "accepting" in frame


def test_a_counter_reset_counts_from_zero() -> None:
    # The gateway restarted between the scrapes: 1,000 -> 400 means 400 new messages.
    after = BEFORE.replace('transport="tcp"} 1000', 'transport="tcp"} 400')
    frame = render_text(parse_metrics(BEFORE, at=0.0), parse_metrics(after, at=1.0), width=140)
    assert table_rows(frame)["tcp"][0] == "400"


def test_bad_text_is_a_protocol_error() -> None:
    from trio_gateway import ProtocolError

    with pytest.raises(ProtocolError):
        parse_metrics("trio_gateway_x{unterminated 1\n")


def test_main_rejects_a_bad_admin_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--admin", "nonsense"]) == 2
    assert "--admin" in capsys.readouterr().err
    assert main(["--admin", "127.0.0.1:9100", "--interval", "0"]) == 2


def test_send_progress_is_silent_off_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with send_progress(1_000_000, console=console) as advance:
        for _ in range(10):
            advance(100_000)
    assert out.getvalue() == ""


def test_send_progress_draws_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    with send_progress(1_000_000, console=console) as advance:
        for _ in range(4):
            advance(250_000)
    drawn = out.getvalue()
    assert "sending" in drawn
    assert "1000000/1000000" in drawn


def test_a_frame_fits_80_by_24_with_the_sink_row_and_a_quit_hint() -> None:
    sink = "file:/var/lib/trio_gateway/a/long/path/out.jsonl"
    up = f'# TYPE trio_gateway_sink_up gauge\ntrio_gateway_sink_up{{sink="{sink}"}} 0\n'
    before = BEFORE.replace('sink="null"', f'sink="{sink}"') + up
    after = AFTER.replace('sink="null"', f'sink="{sink}"') + up
    console = Console(width=80, height=24, force_terminal=True, color_system=None)
    with console.capture() as capture:
        console.print(
            render(
                parse_metrics(before, at=1.0),
                parse_metrics(after, at=3.0),
                target="127.0.0.1:9100",
                hint="q quit",
            )
        )
    lines = capture.get().splitlines()
    assert len(lines) <= 23, lines  # the last line of the terminal stays for the cursor
    assert max(len(line) for line in lines) <= 80
    header = lines[0]
    assert "not ready" in header and "sink down" in header and "q quit" in header
    sink_row = next(line for line in lines if line.startswith("file:/var/lib"))
    assert "…" in sink_row and "down" in sink_row and sink_row.rstrip().endswith("40.2k")
