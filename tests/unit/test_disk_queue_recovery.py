"""The disk queue's recovery, fuzzed: damage a segment (cut it short, flip a byte, remove it)
at a random place, reopen, and exactly the whole runs before the first damaged record come
back, in order; the rest is cut and counted, and the queue goes on."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_gateway._message import Origin
from trio_gateway.queues import DiskQueue

A = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1.5)
SEGMENT_BYTES = 700  # a few runs a segment: damage one, and the later segments are cut too

runs_strategy = st.lists(
    st.lists(st.binary(max_size=300), min_size=1, max_size=4), min_size=1, max_size=10
)


async def _write(directory: Path, runs: list[list[bytes]]) -> None:
    # No fsync per run (what is damaged is the files, whatever reached the platter): quick.
    async with DiskQueue(directory, segment_bytes=SEGMENT_BYTES, fsync="interval") as queue:
        for run in runs:
            queue.put_many_nowait(run, origin=A)
            await queue.wait_stored()


def _layout(directory: Path) -> list[tuple[int, int, int]]:
    """(segment, offset, record size) of each run, in order, as the index holds them."""
    with sqlite3.connect(directory / "queue.sqlite3") as conn:
        rows = conn.execute(
            "SELECT segment, start, 4 * count + nbytes FROM queued_runs ORDER BY id"
        ).fetchall()
    return [tuple(row) for row in rows]


def _segment(directory: Path, number: int) -> Path:
    return directory / "segments" / f"{number:010d}.seg"


def _damage(directory: Path, how: str, victim: int, where: float) -> int:
    """Damage the record of run ``victim``; the index of the first run that cannot survive."""
    layout = _layout(directory)
    segment, start, size = layout[victim]
    path = _segment(directory, segment)
    offset = start + min(int(where * size), size - 1)
    if how == "truncate":
        os.truncate(path, offset)
    elif how == "flip":
        with path.open("r+b") as file:
            file.seek(offset)
            byte = file.read(1)[0]
            file.seek(offset)
            file.write(bytes([byte ^ 0x5A]))
    else:
        path.unlink()
        return min(i for i, (s, _, _) in enumerate(layout) if s == segment)
    return victim


async def _reopen(directory: Path) -> tuple[list[bytes], int, int]:
    async with DiskQueue(directory, segment_bytes=SEGMENT_BYTES, fsync="interval") as queue:
        payloads: list[bytes] = []
        while len(queue):
            payloads += queue.take_batch_nowait(100).payloads
            queue.settle()
        queue.put_many_nowait([b"after"], origin=A)  # the queue goes on past the cut
        await queue.wait_stored()
        return payloads, queue.recovered, queue.cut


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    runs=runs_strategy,
    how=st.sampled_from(["truncate", "flip", "remove"]),
    pick=st.floats(0, 1, exclude_max=True),
    where=st.floats(0, 1, exclude_max=True),
)
def test_exactly_the_runs_before_the_damage_come_back(
    runs: list[list[bytes]], how: str, pick: float, where: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        trio.run(_write, directory, runs)
        first_bad = _damage(directory, how, int(pick * len(runs)), where)
        payloads, recovered, cut = trio.run(_reopen, directory)
        kept = runs[:first_bad]
        assert payloads == [p for run in kept for p in run]
        assert recovered == len(payloads)
        assert cut == sum(map(len, runs[first_bad:]))
        payloads, recovered, cut = trio.run(_reopen, directory)
        assert (payloads, recovered, cut) == ([b"after"], 1, 0)
