"""The IoT example, end to end: the gateway built from iot.toml (ports and files pointed at
this test's), bulbs sending readings over UDP and over a gRPC stream (grpcio, the official
client), and bulbs listening over WebSocket for their room's level; the readings are read back
from SQLite."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from helpers import wait_until
from trio_websocket import open_websocket_url

from trio_gateway import WebSocketBroadcastSink
from trio_gateway._cli import main
from trio_gateway._config import build_pipelines, load_config
from trio_gateway._proto import gateway_pb2

HERE = Path(__file__).resolve().parent


def reading(room: str, device: str, lux: float) -> bytes:
    return json.dumps({"room": room, "device": device, "lux": lux}).encode()


def stream_over_grpc(port: int, payloads: list[bytes]) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream_unary(
            "/trio_gateway.v1.Gateway/Stream",
            request_serializer=gateway_pb2.Message.SerializeToString,
            response_deserializer=gateway_pb2.Ack.FromString,
        )
        ack = stream(gateway_pb2.Message(payload=p, sequence=i) for i, p in enumerate(payloads))
        return int(ack.accepted_count)


@pytest.mark.slow
async def test_bulbs_over_udp_and_grpc_get_their_rooms_level_back(tmp_path: Path) -> None:
    text = (HERE / "iot.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text)
    text = re.sub(r"ws-listen:127\.0\.0\.1:\d+", "ws-listen:127.0.0.1:0", text)
    text = text.replace('"sqlite:readings.db"', f'"sqlite:{tmp_path / "readings.db"}"')
    text = text.replace('"readings.rejected.jsonl"', f'"{tmp_path / "rejected.jsonl"}"')
    (tmp_path / "iot.toml").write_text(text)
    pipelines = build_pipelines(load_config(str(tmp_path / "iot.toml")))
    lights = pipelines["lights"]
    commands = lights.fanout.branches[1].sink if lights.fanout else None
    assert isinstance(commands, WebSocketBroadcastSink)
    heard: dict[str, list[dict[str, Any]]] = {"kitchen": [], "hall": []}
    count = 100

    async def bulb(room: str) -> None:
        assert commands is not None and commands.bound is not None
        async with open_websocket_url(f"ws://127.0.0.1:{commands.bound[1]}/{room}") as ws:
            while len(heard[room]) < count:
                heard[room].append(json.loads(await ws.get_message()))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(pipelines.run)
            (udp_address,), (grpc_address,) = bound["lights"]
            async with trio.open_nursery() as bulbs:
                bulbs.start_soon(bulb, "kitchen")
                bulbs.start_soon(bulb, "hall")
                await wait_until(lambda: commands.clients == 2)
                with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as udp:
                    for _ in range(count):
                        await udp.sendto(reading("kitchen", "bulb-1", 100.0), udp_address)
                        await trio.sleep(0.001)  # a bulb's pace, not a flood
                hall = [reading("hall", "bulb-2", 600.0)] * count
                accepted = await trio.to_thread.run_sync(stream_over_grpc, grpc_address[1], hall)
                assert accepted == count
            pipelines.shutdown()
    # Dark kitchen (100 lux of the 300 wanted): bulbs at 67 %; bright hall: off.
    assert {m["level"] for m in heard["kitchen"]} == {67}
    assert {m["level"] for m in heard["hall"]} == {0}
    assert heard["hall"][-1] == {
        "room": "hall", "device": "bulb-2", "lux": 600.0, "avg_lux": 600.0, "level": 0,
    }  # fmt: skip
    with sqlite3.connect(tmp_path / "readings.db") as db:
        rows = db.execute("SELECT room, count(*), max(level) FROM readings GROUP BY room")
        assert sorted(rows) == [("hall", count, 0), ("kitchen", count, 67)]
    assert pipelines.ledger.balanced and pipelines.ledger.delivered == 2 * count


def test_the_readme_picture_is_drawn_from_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(HERE / "iot.toml"), "--mermaid"]) == 0
    drawn = capsys.readouterr().out
    assert f"```mermaid\n{drawn}```" in (HERE / "README.md").read_text()
