"""Fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ServeProcess
from jetstream import NatsServer


@pytest.fixture
def serve() -> Iterator[type[ServeProcess]]:
    """``ServeProcess``, with every process started through it killed after the test."""
    started: list[ServeProcess] = []

    class _Tracked(ServeProcess):
        def __init__(self, args: list[str], **kwargs: object) -> None:
            started.append(self)
            super().__init__(args, **kwargs)  # type: ignore[arg-type]

    yield _Tracked
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.communicate()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream on loopback, port chosen by the server, stopped after."""
    server = NatsServer(tmp_path)
    server.start()
    yield server
    server.stop()
