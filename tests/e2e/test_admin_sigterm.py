"""The admin endpoint of a gateway program in a subprocess, through its SIGTERM drain."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from trio_gateway.loadgen import send_tcp

_SIGTERM_GATEWAY = """
import sys, trio
from trio_gateway import Gateway, Sink, TcpSource
from trio_gateway.admin import AdminServer

class SlowSink(Sink):
    name = "slow"
    async def send(self, batch):
        await trio.sleep(0.4)   # every batch takes 0.4 s: the drain lasts a while

async def main():
    admin = AdminServer("127.0.0.1", 0)
    gateway = Gateway(sources=[TcpSource()], sink=SlowSink(), services=[admin], batch_size=10,
                      handle_signals=True, grace_period=0.1, drain_timeout=30)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(gateway.run)
        print(bound[0][0][1], admin.bound[1], flush=True)
    print(gateway.ledger.to_json(), flush=True)

trio.run(main)
"""


@pytest.mark.slow
async def test_sigterm_turns_readyz_503_until_the_drain_ends() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = functools.partial(
                trio.run_process,
                [sys.executable, "-c", _SIGTERM_GATEWAY],
                stdout=subprocess.PIPE,
                check=False,
            )
            process: trio.Process = await nursery.start(run)
            assert process.stdout is not None
            buffered = b""
            while b"\n" not in buffered:
                buffered += await process.stdout.receive_some(1024)
            first, buffered = buffered.split(b"\n", 1)
            source_port, admin_port = map(int, first.split())
            await send_tcp("127.0.0.1", source_port, count=50, size=10)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}") as client:
                assert (await client.get("/readyz")).status_code == 200
                process.send_signal(signal.SIGTERM)
                # 50 messages in batches of 10 at 0.4 s each: the drain takes about 2 s.
                statuses: list[int] = []
                with trio.move_on_after(1.0):
                    while True:
                        statuses.append((await client.get("/readyz")).status_code)
                        await trio.sleep(0.05)
                # (The first answer may still beat the signal's delivery; once 503, always 503.)
                assert 503 in statuses, statuses
                after = statuses[statuses.index(503) :]
                assert set(after) == {503} and len(after) >= 5, statuses
                assert (await client.get("/healthz")).status_code == 200
            while not buffered.endswith(b"\n") or b"ledger" not in buffered:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    break
                buffered += chunk
            assert await process.wait() == 0
    ledger = json.loads(buffered.decode().strip().splitlines()[-1])["ledger"]
    assert ledger["received"] == ledger["delivered"] == 50
    assert ledger["balanced"]
