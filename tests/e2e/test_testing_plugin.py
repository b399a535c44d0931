"""The test kit from the outside: its import cost, and the pytest plugin in a pytest subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_LEAKY = '''
import pytest
from trio_gateway import Ingress
from trio_gateway.testing import MemorySource


class LeakySource(MemorySource):
    """Counts a message it never queues: a bug the ledger check must catch."""

    async def run(self, ingress: Ingress, *, task_status=None) -> None:
        ingress.counters.received += 1
        await super().run(ingress, task_status=task_status)


@pytest.mark.trio
async def test_leaky(gateway_factory):
    await gateway_factory(sources=[LeakySource()])


@pytest.mark.trio
async def test_fine(gateway_factory, memory_source, recording_sink, autojump_clock):
    await gateway_factory()
    await memory_source.send(b"x")
    await recording_sink.wait_for(1)
'''


def test_importing_the_kit_does_not_import_pytest() -> None:
    code = "import sys, trio_gateway.testing; print('pytest' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "False"


def _run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest in ``directory`` with its own empty config (no trio_mode) and only pytest-trio and
    our plugin loaded explicitly, whether or not the entry point is installed."""
    (directory / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "pytest_trio.plugin"]
    command += ["-p", "trio_gateway.testing._plugin", "-p", "no:cacheprovider", "-q", *args]
    return subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_docs_examples_pass_without_trio_mode(tmp_path: Path) -> None:
    examples = sorted((REPO / "docs" / "examples").glob("test_*.py"))
    assert len(examples) >= 4
    for example in examples:
        shutil.copy(example, tmp_path)
    result = _run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


def test_fixture_fails_a_test_whose_ledger_does_not_balance(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(_LEAKY)
    result = _run_pytest(tmp_path, "-rf")
    assert result.returncode == 1, result.stdout + result.stderr
    # pytest-trio tears fixtures down inside the test's run: the check fails the test itself.
    assert "1 failed, 1 passed" in result.stdout
    assert "FAILED test_leaky.py::test_leaky" in result.stdout
    assert "does not balance" in result.stdout
