"""The supervisor's side of a worker's pipes: one read loop, two framers, the JSON-lines format.

The bounded-line framer has its own test in tests/e2e/test_workers.py, beside the whole path
with real worker processes.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from trio_gateway._log import RateLimitedLogger
from trio_gateway.workers._logs import JsonLinesHandler, read_line
from trio_gateway.workers._pipes import Lines, WholeLines, pump


def test_stdout_is_relayed_in_whole_lines_and_an_endless_line_is_not_held() -> None:
    relay = WholeLines(limit=8)
    assert relay.feed(b"one\ntw") == [b"one\n"]
    assert relay.feed(b"o\nthree\nfo") == [b"two\nthree\n"]  # one piece per read
    assert relay.feed(b"ur") == []  # held: no newline yet, under the limit
    assert relay.feed(b"-and-more") == [b"four-and-more"]  # past the limit: passed on as is
    assert relay.feed(b"\nfive") == [b"\n"]
    assert relay.close() == [b"five"]
    assert relay.close() == []


async def test_one_loop_reads_a_pipe_to_its_end_through_either_framer() -> None:
    for framer, expected in (
        (Lines(limit=100), [b"a", b"bb", b"tail"]),
        (WholeLines(limit=100), [b"a\n", b"bb\n", b"tail"]),
    ):
        send, receive = trio.testing.memory_stream_one_way_pair()
        got: list[bytes] = []

        async def deliver(piece: bytes, got: list[bytes] = got) -> None:
            got.append(piece)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, receive, framer, deliver)
            for data in (b"a\n", b"bb\nta", b"il"):
                await send.send_all(data)
                await trio.testing.wait_all_tasks_blocked()
            await send.aclose()
        assert got == expected


def test_a_worker_log_record_is_logged_again_and_an_event_is_returned(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    # The worker side writes it ...
    record = logging.LogRecord(
        "trio_gateway.sources.tcp", logging.ERROR, "", 0, "bad %s", ("frame",), None
    )
    JsonLinesHandler().emit(record)
    line = capsys.readouterr().err
    assert json.loads(line) == {
        "log": {"level": "ERROR", "logger": "trio_gateway.sources.tcp", "message": "bad frame"}
    }
    # ... and the supervisor logs it again under the worker's logger.
    log = RateLimitedLogger(logging.getLogger("trio_gateway.worker.3"))
    with caplog.at_level(logging.INFO, logger="trio_gateway.worker.3"):
        assert read_line(line.rstrip("\n").encode(), log) is None
        assert read_line(b'{"event": "ready", "pid": 7}', log) == {"event": "ready", "pid": 7}
        assert read_line(b"Traceback (most recent call last):\r", log) is None
        assert read_line(b"", log) is None
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("trio_gateway.worker.3", logging.ERROR, "sources.tcp: bad frame"),
        ("trio_gateway.worker.3", logging.WARNING, "Traceback (most recent call last):"),
    ]
