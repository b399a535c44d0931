"""``top`` against a live gateway and an unreachable admin endpoint."""

from __future__ import annotations

import io

import trio
from helpers import table_rows, wait_until
from rich.console import Console

from trio_gateway import Gateway, NullSink, RingBuffer, TcpSource, UdpSource
from trio_gateway.admin import AdminServer
from trio_gateway.admin.top import fetch_metrics, parse_metrics, render, run_top
from trio_gateway.loadgen import send_tcp, send_udp


async def test_once_against_a_live_gateway() -> None:
    gateway = Gateway(
        sources=[TcpSource(), UdpSource()],
        sink=NullSink(),
        queue=RingBuffer(1000),
        services=[AdminServer(port=0)],
    )
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=False, color_system=None)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            host, port = gateway.service_values[0]
            await send_tcp(*bound[0][0], count=2500, size=18)
            await send_udp(*bound[1][0], count=40, size=18, rate=10_000)
            status = await run_top(host, port, interval=0.05, once=True, console=console)
            text = await fetch_metrics(host, port)
            gateway.shutdown()
    assert status == 0
    table = table_rows(out.getvalue())
    assert table["tcp"][3] == "2.5k"
    assert table["udp"][3] == "40"
    assert table["null"][-1] == "2.5k"  # delivered (2,540)
    assert "accepting" in out.getvalue()
    assert parse_metrics(text).total("trio_gateway_received_messages_total") == 2540


async def _unused_port() -> int:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port: int = unused.getsockname()[1]
    return port  # closed: nothing listens there


async def test_live_mode_redraws_and_survives_an_unreachable_endpoint() -> None:
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    port = await _unused_port()
    with trio.fail_after(10):
        status = await run_top("127.0.0.1", port, interval=0.01, console=console, frames=3)
    assert status == 0
    assert "retrying" in out.getvalue()


async def test_live_mode_gives_up_on_an_endpoint_unreachable_past_the_grace() -> None:
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    port = await _unused_port()
    with trio.fail_after(10):
        status = await run_top(
            "127.0.0.1", port, interval=0.01, console=console, unreachable_grace=0.2
        )
    assert status == 1
    assert "unreachable for 0.2 s" in out.getvalue()


async def test_once_reports_an_unreachable_endpoint() -> None:
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None)
    port = await _unused_port()
    with trio.fail_after(10):
        status = await run_top("127.0.0.1", port, once=True, console=console)
    assert status == 1
    assert f"127.0.0.1:{port}" in out.getvalue()


async def test_a_frame_of_named_pipelines_shows_each_pipeline_and_each_sink() -> None:
    """Scrapes of a real Pipelines endpoint (a fan-out, one sink refusing for good, a route
    to another pipeline): rates per pipeline and per sink, in 80 columns by 24 lines."""
    from trio_gateway import FromPipeline, Pipeline, Pipelines, QueuedSink, ToPipeline
    from trio_gateway.testing import MemorySource, RecordingSink

    source = MemorySource()
    stalled = RecordingSink("stalled")
    stalled.stall()
    pipelines = Pipelines(
        [
            Pipeline(
                "ingest",
                sources=[source],
                sinks=[
                    NullSink(),
                    QueuedSink(stalled, capacity=2000, policy="drop_oldest"),
                    ToPipeline("archive"),
                ],
                drain_timeout=0.2,  # the stalled sink's messages are abandoned at once
            ),
            Pipeline("archive", sources=[FromPipeline("ingest")], sinks=[NullSink()]),
        ],
        admin=AdminServer(port=0, process_metrics=False),
    )
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipelines.run)
            host, port = pipelines.admin_address
            await source.send_many([b"x"] * 1000)
            await wait_until(lambda: pipelines["archive"].ledger.delivered == 1000)
            first = parse_metrics(await fetch_metrics(host, port), at=10.0)
            await source.send_many([b"y"] * 4000)
            await wait_until(lambda: pipelines["archive"].ledger.delivered == 5000)
            second = parse_metrics(await fetch_metrics(host, port), at=12.0)
            pipelines.shutdown()
    console = Console(width=80, height=24, force_terminal=True, color_system=None)
    with console.capture() as capture:
        console.print(render(first, second, target=f"{host}:{port}", hint="q quit"))
    frame = capture.get()
    assert len(frame.splitlines()) <= 23 and max(map(len, frame.splitlines())) <= 80
    table = table_rows(frame)
    # 4,000 messages in 2 s into each pipeline and out of it (the route feeds archive).
    assert table["ingest"] == ["2.0k", "2.0k", "0", "0/10.0k 0%", "5.0k", "5.0k"]
    assert table["archive"][:2] == ["2.0k", "2.0k"]
    assert table["pipeline:ingest"][0] == "2.0k"  # the route, as the listener of archive
    assert table["ingest/null"][:2] == ["up", "2.0k"] and table["ingest/null"][-1] == "5.0k"
    (route,) = [cells for name, cells in table.items() if name.startswith("ingest/pipeline:")]
    assert route[:2] == ["up", "2.0k"] and route[-1] == "5.0k"
    stalled = table["ingest/stalled"]  # its queue full, its oldest dropped: lost
    assert stalled[1:4] == ["0", "-", "-"] and stalled[-2] != "0" and stalled[-1] == "0"
    assert table["archive/null"][1] == "2.0k" and table["archive/null"][-1] == "5.0k"
    assert "by pipeline" in frame and "by sink" in frame and "by transport" not in frame
