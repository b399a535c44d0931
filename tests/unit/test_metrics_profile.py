"""``serve --profile FILE``: the profiled() context manager around a real gateway run."""

from __future__ import annotations

import importlib.util
import pstats
from pathlib import Path

import pytest
import trio

from trio_gateway import ConfigurationError, Gateway, NullSink, TcpSource
from trio_gateway._profile import check_profile_path, main, profiled, summary
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


def test_the_profile_is_written_when_the_run_fails(tmp_path: Path) -> None:
    path = tmp_path / "failed.prof"

    async def boom() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), profiled(path):
        trio.run(boom)
    assert pstats.Stats(str(path)).total_calls > 0  # type: ignore[attr-defined]


@pytest.mark.skipif(importlib.util.find_spec("pyinstrument") is None, reason="optional")
def test_pyinstrument_html_of_a_run(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    with profiled(path):
        trio.run(_short_run)
    html = path.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html")
    assert "pyinstrument" in html


def test_bad_paths_fail_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=r"--profile: directory .* does not exist"):
        check_profile_path(tmp_path / "missing" / "x.prof")
    with pytest.raises(ConfigurationError, match="is a directory"):
        check_profile_path(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pyinstrument" else real_find_spec(name, *a),
    )
    with (
        pytest.raises(ConfigurationError, match="pip install pyinstrument"),
        profiled(tmp_path / "x.html"),
    ):
        raise AssertionError("must not run")
    assert check_profile_path(tmp_path / "x.prof") == tmp_path / "x.prof"
