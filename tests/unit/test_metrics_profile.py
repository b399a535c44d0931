"""``serve --profile FILE``: the profiled() context manager around a real gateway run."""

from __future__ import annotations

import importlib.util
import pstats
from pathlib import Path

import pytest
import trio

from trio_gateway import ConfigurationError
from trio_gateway._profile import check_profile_path, profiled


def test_the_profile_is_written_when_the_run_fails(tmp_path: Path) -> None:
    path = tmp_path / "failed.prof"

    async def boom() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), profiled(path):
        trio.run(boom)
    assert pstats.Stats(str(path)).total_calls > 0  # type: ignore[attr-defined]


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
