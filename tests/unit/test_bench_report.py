"""bench's report for a run of some rows only (``python -m bench --only ROW``): every row alone
gives its tables and the charts that have a column for it, and no empty chart.

Charts with no column crashed (``--only http-wire``: subplots with no panel); empty charts
were drawn next. The measurements here are made up: the report's shape is under test, not
the figures.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO))  # bench/ is a package beside trio_gateway, not installed
from bench import _report
from bench.run import ROWS, Row

pytest.importorskip("matplotlib.pyplot")  # once, at collection: seconds of its own
CHARTS = {"bench-transports.png", "bench-vs-asyncio.png", "bench-wire.png"}


def document(row: Row) -> dict[str, Any]:
    """A results document of ``row`` alone: every implementation, two sizes, each parallel
    setting the row runs (the rows with requests in flight run them one connection at a time)."""
    sizes = [18, 4266]
    parallels = (False,) if row.inflight else (False, True)
    results = [
        {
            "row": row.key,
            "size": size,
            "parallel": parallel,
            "impl": impl,
            "connections": 1,
            "inflight": 1,
            "status": "ok",
            "note": "",
            "median_ns_per_op": 1000.0 * (n + 1),
            "median_cpu_ns_per_op": 800.0 * (n + 1),
            "median_client_cpu_ns_per_op": 300.0,
            "median_loss": 0.0,
            "samples": [],
        }
        for n, impl in enumerate(row.impls)
        for size in sizes
        for parallel in parallels
    ]
    return {
        "rows": [row.described()],
        "results": results,
        "settings": {"sizes": sizes},
        "queues": {"status": "skipped"},
    }


@pytest.mark.parametrize("row", ROWS, ids=[row.key for row in ROWS])
def test_one_row_alone_gets_its_tables_and_only_charts_with_columns(
    row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figure = pytest.importorskip("matplotlib.figure")
    # Laying out and rendering PNGs is matplotlib's work (seconds for twelve rows): the
    # figures are still built, panels and bars, which is where no column crashed.
    monkeypatch.setattr(figure.Figure, "tight_layout", lambda self: None)
    monkeypatch.setattr(figure.Figure, "savefig", lambda self, path, **kw: path.write_bytes(b"png"))
    doc = document(row)
    res = _report.Results(doc)
    img = tmp_path / "img"
    img.mkdir()
    for name in CHARTS:  # an earlier run's charts in the same directory
        (img / name).write_bytes(b"stale")
    written = {path.name for path in _report.charts(res, doc, img)}
    expected = set()
    if row.key in _report.TABLE_ROWS:
        expected |= {"bench-transports.png", "bench-vs-asyncio.png"}
    if row.key in _report.WIRE_ROWS:
        expected.add("bench-wire.png")
    assert written == expected
    assert {path.name for path in img.iterdir()} == expected  # no stale chart left
    for table in (
        _report.transports_table,
        _report.peers_table,
        _report.cpu_table,
        _report.wire_table,
    ):
        assert table(res).startswith("|")
