"""Bad flags and bad config keys: one line on stderr naming the key, exit status 2.

These call the command line's ``main`` in-process (a subprocess per case cost ~1 s each, for
~20 cases); tests/e2e/test_cli.py keeps one subprocess case of each kind, so the real
``python -m trio_gateway`` path stays covered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_gateway._cli import main
from trio_gateway._log import CHATTY_LOGGERS


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # ``serve`` points the package's logger at the stderr of the moment (capsys's, here):
    # put back what was there, so no later test logs into a closed capture.
    names = ("trio_gateway", *CHATTY_LOGGERS)
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in map(logging.getLogger, names)]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's errors leave through SystemExit
        assert isinstance(exc.code, int)
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["serve", "--capacity", "0"], "queue.capacity"),
        (["serve", "--tcp", "nonsense"], "--tcp"),
        (["serve", "--tcp", "127.0.0.1:99999"], "--tcp"),
        (["serve", "--sink", "kafka://x"], "sink"),
        (["serve", "--queue", "channel", "--policy", "drop-oldest"], "queue.policy"),
        (["serve", "--processor", "no_such_module_xyz:f"], "processor"),
        (["serve", "--drain-timeout", "-1"], "gateway.drain_timeout"),
        (["serve", "--policy", "sometimes"], "--policy"),
        (["send", "--tcp", "127.0.0.1:1", "--count", "-5"], "--count"),
    ],
)
def test_bad_flags_print_one_line_naming_the_key(
    capsys: pytest.CaptureFixture[str], args: list[str], key: str
) -> None:
    code, stderr = run_main(capsys, *args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert key in lines[0]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[queue]\ncapacity = 'big'\n", "queue.capacity"),
        ("[queue]\nkind = 'heap'\n", "queue.kind"),
        ("[queu]\ncapacity = 5\n", "config.queu"),
        ("[[sources]]\ntransport = 'carrier-pigeon'\n", "sources[0].transport"),
        ("[[sources]]\ntransport = 'tcp'\nlisten = ':70000'\n", "sources[0].listen"),
        ("[[sources]]\ntransport = 'tcp'\nframing = 'xml'\n", "sources[0].framing"),
        (
            "[[sources]]\ntransport = 'tcp'\nmax_connections = 'many'\n",
            "sources[0].max_connections",
        ),
        ("[[sources]]\ntransport = 'udp'\ncolour = 'blue'\n", "sources[0].colour"),
        ("[gateway]\ndrain_timeout = 'soon'\n", "gateway.drain_timeout"),
        ("[sink]\nurl = 'null'\nfsync = true\n", "sink.fsync"),
        ("[sink]\nurl = 'file:/tmp/x.jsonl'\nfsync = 'yes'\n", "sink.fsync"),
        ("this is not toml", "gateway.toml: invalid TOML"),
    ],
)
def test_bad_config_prints_one_line_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, toml: str, key: str
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        code, stderr = run_main(capsys, *args)
        assert code == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert key in lines[0]
