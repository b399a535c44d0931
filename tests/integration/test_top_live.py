"""``top`` against a live gateway and an unreachable admin endpoint."""

from __future__ import annotations

import io

import trio
from helpers import table_rows
from rich.console import Console

from trio_gateway import Gateway, NullSink, RingBuffer, TcpSource, UdpSource
from trio_gateway.admin import AdminServer
from trio_gateway.admin.top import fetch_metrics, parse_metrics, run_top
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
