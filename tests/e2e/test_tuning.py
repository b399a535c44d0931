"""``trio_gateway.tuning.tune_allocator``: glibc's trim and mmap thresholds, once per process."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ServeProcess

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# The setting shows in its effect: with glibc's default 128 KiB trim threshold, freeing what
# sits at the top of the heap gives it back to the kernel (the break moves down); tuned, the
# memory stays for the next batch.
_PROBE = """
import ctypes, sys
from trio_gateway.tuning import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator() is True
    assert tune_allocator() is True  # once per process; the second call changes nothing
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
# 100 KiB blocks: under the default mmap threshold too, so they come from the heap.
blocks = [libc.malloc(100 << 10) for _ in range(80)]
grown = libc.sbrk(0)
for block in reversed(blocks):
    libc.free(block)
print(grown - libc.sbrk(0))  # bytes given back to the kernel
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("mode", ["default", "tuned"])
def test_freed_memory_stays_with_the_process_once_tuned(mode: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    returned = int(result.stdout)
    if mode == "tuned":
        assert returned == 0
    else:
        # How much goes back depends on what else the interpreter left at the top of the heap
        # (4 MiB or more with an eagerly imported package, 200 KiB with the lazy one): some.
        assert returned > 0


_FREEZE_PROBE = """
import gc, time
from trio_gateway.tuning import freeze_startup_objects
import trio_gateway.sources.websocket, trio_gateway.sinks  # what a gateway imports
before = len(gc.get_objects())
frozen = freeze_startup_objects()
print(before, frozen, len(gc.get_objects()))
"""


def test_freezing_takes_the_start_out_of_every_later_collection() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FREEZE_PROBE], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    before, frozen, after = map(int, result.stdout.split())
    assert before > 10_000  # tens of thousands of objects that every full collection walked
    assert frozen > 0.9 * before  # the start's garbage was collected, the rest frozen
    assert after < 100  # what a full collection walks now


@pytest.mark.parametrize("shape", ["one gateway", "pipelines"])
def test_serve_freezes_the_start_before_it_says_ready(shape: str, tmp_path: Path) -> None:
    if shape == "pipelines":
        config = tmp_path / "gateway.toml"
        config.write_text(
            '[pipelines.p]\n[[pipelines.p.sources]]\ntransport = "tcp"\nlisten = "127.0.0.1:0"\n'
            '[[pipelines.p.sinks]]\nurl = "null"\n'
        )
        args = ["--config", str(config)]
    else:
        args = ["--tcp", "127.0.0.1:0", "--sink", "null"]
    gateway = ServeProcess([*args, "--admin", "off", "--log-level", "debug"])
    code, stderr = gateway.stop()
    assert code == 0
    froze = [line for line in gateway.stderr_lines if "froze" in line]
    assert len(froze) == 1, stderr
    assert int(froze[0].split("froze ")[1].split()[0]) > 10_000
