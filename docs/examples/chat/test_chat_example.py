"""The chat example, end to end: two gateways built from chat.toml (ports and servers pointed
at this test's), WebSocket clients on each, one room. Every message reaches the room's
clients on both gateways, in each author's order, through a real nats-server (NATS keeps
each publisher's order, not one interleaving of two publishers for every subscriber: see the
README); the history is read back from a real PostgreSQL."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import wait_until
from jetstream import NatsServer
from pgserver import PostgresServer
from trio_websocket import open_websocket_url

from trio_gateway import Pipelines, WebSocketBroadcastSink
from trio_gateway._cli import main
from trio_gateway._config import build_pipelines, load_config
from trio_gateway.sinks import NatsSink

HERE = Path(__file__).resolve().parent


def gateway(tmp_path: Path, name: str, nats: NatsServer, postgres: PostgresServer) -> Pipelines:
    text = (HERE / "chat.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text)
    text = re.sub(r"ws-listen:127\.0\.0\.1:\d+", "ws-listen:127.0.0.1:0", text)
    text = text.replace("127.0.0.1:4222", f"127.0.0.1:{nats.port}")
    text = text.replace("host=/var/run/postgresql", f"host={postgres.directory}")
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return build_pipelines(load_config(str(path)).with_default_sources())


def broadcast_port(pipelines: Pipelines) -> int:
    sink = pipelines["out"].gateway.sink
    assert isinstance(sink, WebSocketBroadcastSink) and sink.bound is not None
    return sink.bound[1]


@pytest.mark.slow
async def test_two_gateways_relay_a_room_in_one_order_and_keep_the_history(
    tmp_path: Path, nats_server: NatsServer, postgres: PostgresServer
) -> None:
    postgres.execute("DROP TABLE IF EXISTS chat_history")
    postgres.execute((HERE / "schema.sql").read_text())
    a = gateway(tmp_path, "a", nats_server, postgres)
    b = gateway(tmp_path, "b", nats_server, postgres)
    per_author = 50
    heard: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}

    async def listen(name: str, port: int) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/lobby") as ws:
            while len(heard[name]) < 2 * per_author:
                heard[name].append(json.loads(await ws.get_message()))

    async def talk(address: tuple[str, int], author: str) -> None:
        async with open_websocket_url(f"ws://{address[0]}:{address[1]}/") as ws:
            for i in range(per_author):
                message = {"room": "lobby", "author": author, "text": f"{author} says {i}"}
                await ws.send_message(json.dumps(message))
                await trio.sleep(0.002)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound_a = await nursery.start(a.run)
            bound_b = await nursery.start(b.run)
            async with trio.open_nursery() as clients:
                clients.start_soon(listen, "a", broadcast_port(a))
                clients.start_soon(listen, "b", broadcast_port(b))
                for pipelines in (a, b):
                    sink = pipelines["out"].gateway.sink
                    await wait_until(lambda sink=sink: sink.clients == 1)  # type: ignore[misc]
                clients.start_soon(talk, bound_a["in"][0][0], "alice")
                clients.start_soon(talk, bound_b["in"][0][0], "bob")
            await wait_until(
                lambda: len(postgres.query("SELECT id FROM chat_history")) == 2 * per_author
            )
            a.shutdown()
            b.shutdown()
    assert sorted(m["id"] for m in heard["a"]) == sorted(m["id"] for m in heard["b"])
    for listener in ("a", "b"):
        for author in ("alice", "bob"):
            said = [m["text"] for m in heard[listener] if m["author"] == author]
            assert said == [f"{author} says {i}" for i in range(per_author)]
    rows = postgres.query(
        "SELECT room, count(*), count(DISTINCT id) FROM chat_history GROUP BY room"
    )
    assert rows == [("lobby", 2 * per_author, 2 * per_author)]
    assert a.ledger.balanced and b.ledger.balanced
    # The live path is confirmed by the server (no JetStream ack), yet the history, read
    # from the stream, has every message.
    for pipelines in (a, b):
        sink = pipelines["in"].gateway.sink
        assert isinstance(sink, NatsSink) and sink.confirm == "server"
        assert (sink.published, sink.stored) == (per_author, 0)


def test_the_readme_picture_is_drawn_from_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(HERE / "chat.toml"), "--mermaid"]) == 0
    drawn = capsys.readouterr().out
    assert f"```mermaid\n{drawn}```" in (HERE / "README.md").read_text()
