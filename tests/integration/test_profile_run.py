"""Profiling a real run (a TCP source on port 0): cProfile stats and pyinstrument HTML."""

from __future__ import annotations

import importlib.util
import pstats
from pathlib import Path

import pytest
import trio

from trio_gateway import Gateway, NullSink, TcpSource
from trio_gateway._profile import main, profiled, summary
from trio_gateway.loadgen import send_tcp


async def _short_run() -> int:
    gateway = Gateway(sources=[TcpSource()], sink=NullSink())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            await send_tcp(*bound[0][0], count=20_000, size=18)
            while gateway.ledger.delivered < 20_000:
                await trio.sleep(0.005)
            gateway.shutdown()
    return gateway.ledger.delivered


def test_cprofile_stats_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.prof"
    with profiled(path):
        assert trio.run(_short_run) == 20_000
    stats = pstats.Stats(str(path))
    functions = {name for (_, _, name) in stats.stats}  # type: ignore[attr-defined]
    assert "_handle" in functions  # the TCP source's connection handler
    assert "_pump" in functions
    top = summary(path, limit=5)
    assert "tottime" in top
    assert main([str(path), "3", "cumulative"]) == 0
    assert "cumulative" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("pyinstrument") is None, reason="optional")
def test_pyinstrument_html_of_a_run(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    with profiled(path):
        trio.run(_short_run)
    html = path.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html")
    assert "pyinstrument" in html
