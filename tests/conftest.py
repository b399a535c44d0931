"""Fixtures shared by the test suite, and the guard that keeps tests/unit free of the network
and of subprocesses (what needs them belongs in tests/integration or tests/e2e)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ServeProcess
from jetstream import NatsServer
from pgserver import PostgresServer


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


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server that takes user ``alice``, password ``s3cret`` (and nothing else)."""
    server = NatsServer(tmp_path, args=("--user", "alice", "--pass", "s3cret"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In tests/unit, binding or connecting a network socket or starting a process fails the
    test, naming the folder it belongs in (socket pairs and pipes, which trio uses, are fine)."""
    if request.node.path.parent.name != "unit":
        return

    def refuse(what: str, folder: str) -> Any:
        def refused(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"a unit test {what}: move it to tests/{folder}")

        return refused

    for name in ("bind", "connect", "connect_ex"):
        original = getattr(socket.socket, name)

        def guarded(self: socket.socket, *args: Any, _original: Any = original) -> Any:
            if self.family in (socket.AF_INET, socket.AF_INET6):
                refuse("opened a network socket", "integration")()
            return _original(self, *args)

        monkeypatch.setattr(socket.socket, name, guarded)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("started a process", "e2e"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole run (initdb takes about a second): each test uses
    tables of its own names."""
    server = PostgresServer()
    server.start()
    yield server
    server.stop()
