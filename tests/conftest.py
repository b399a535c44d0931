"""Fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import ServeProcess


@pytest.fixture
def serve() -> Iterator[type[ServeProcess]]:
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
