"""The chat relay as a user would write it on asyncio instead of trio_gateway: the peer of
``bench.chat_relay --relays asyncio,uvloop``.

    python -m bench._chat_peer NATS_URL SUBJECT --out PORT [--in PORT] [--uvloop]

One process is one gateway of the relay, with the two well-kept libraries a user would pick:
``websockets``' asyncio server and ``nats-py``, the official NATS client. ``--in``: each
WebSocket message is published to ``SUBJECT`` (``nc.publish``: core NATS, buffered and
flushed by nats-py's flusher task). ``--out``: clients connect to ``ws://HOST:PORT/ROOM``;
every message heard on ``SUBJECT`` goes to the clients of the room named by its JSON
``room`` field, with ``websockets.broadcast`` (a binary message, as the gateway's broadcast
sink sends). ``--uvloop`` runs it on uvloop's event loop.

It promises less than the gateway does, which favours it: a message counts as passed on
when nats-py has buffered it, not when the server has read it (the gateway's
``confirm = "server"`` waits for a ``PONG`` per batch); nothing bounds what a client can make
it buffer, there is no ledger, no idle deadline and no overflow policy. It is the shortest
correct relay on these libraries, as a measure of what the gateway's guarantees cost.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
from typing import Any

import nats
from websockets.asyncio.server import ServerConnection, broadcast, serve


async def relay(nats_url: str, subject: str, in_port: int | None, out_port: int) -> None:
    nc = await nats.connect(nats_url)
    rooms: dict[str, set[ServerConnection]] = {}

    async def heard(msg: Any) -> None:
        clients = rooms.get(json.loads(msg.data).get("room"))
        if clients:
            broadcast(clients, msg.data)

    async def listener(ws: ServerConnection) -> None:
        room = ws.request.path.strip("/") if ws.request is not None else ""
        clients = rooms.setdefault(room, set())
        clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            clients.discard(ws)

    async def speaker(ws: ServerConnection) -> None:
        async for data in ws:
            await nc.publish(subject, data.encode() if isinstance(data, str) else data)

    await nc.subscribe(subject, cb=heard)
    async with serve(listener, "127.0.0.1", out_port, compression=None):
        if in_port is None:
            ready()
            await asyncio.Future()
        async with serve(speaker, "127.0.0.1", in_port, compression=None, max_queue=None):
            ready()
            await asyncio.Future()


def ready() -> None:
    """Freeze the start out of the collector, as ``serve`` does (``tuning``)."""
    gc.collect()
    gc.freeze()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._chat_peer", description=__doc__)
    parser.add_argument("nats_url")
    parser.add_argument("subject")
    parser.add_argument("--in", dest="in_port", type=int)
    parser.add_argument("--out", dest="out_port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    run = relay(args.nats_url, args.subject, args.in_port, args.out_port)
    if args.uvloop:
        import uvloop

        uvloop.run(run)
    else:
        asyncio.run(run)


if __name__ == "__main__":
    main()
