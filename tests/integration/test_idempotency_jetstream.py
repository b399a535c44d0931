"""Idempotency ids end to end, against a real nats-server: ``send --ids`` over HTTP (one
message per request, and NDJSON) and gRPC (unary and bidi) run twice, as a client that did
not know whether its first run got through would; every message is in JetStream once, with
the id the client gave as its ``Nats-Msg-Id``. Without ids, the same resend is stored twice."""

from __future__ import annotations

import trio
from jetstream import NatsServer, read_stream

from trio_gateway import Gateway
from trio_gateway.loadgen import make_payload, send_grpc, send_http
from trio_gateway.sinks import NatsSink
from trio_gateway.sources import GrpcSource, HttpSource


async def test_a_resent_message_with_its_id_is_in_jetstream_once(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(f"{nats_server.url}/ids.in?stream=IDS&create=true")
    gateway = Gateway(sources=[HttpSource(port=0), GrpcSource(port=0)], sink=sink)
    expected: set[str] = set()
    expected |= {f"h:{n}" for n in range(30)}
    expected |= {f"n:{first}:{i}" for first in range(0, 40, 10) for i in range(10)}
    expected |= {f"u:{n}" for n in range(20)}
    expected |= {f"b:{n}" for n in range(50)}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            http_bound, grpc_bound = await nursery.start(gateway.run)
            url = f"http://127.0.0.1:{http_bound[0][1]}/ingest"
            port = grpc_bound[0][1]
            for _ in range(2):
                runs = [
                    await send_http(url, count=30, size=24, ids="h", concurrency=3),
                    await send_http(url, count=40, size=24, ids="n", ndjson=10),
                    await send_grpc("127.0.0.1", port, count=20, size=24, ids="u"),
                    await send_grpc(
                        "127.0.0.1", port, count=50, size=24, ids="b", mode="bidi", concurrency=2
                    ),
                    await send_http(url, count=5, size=24),  # no ids: stored each time
                ]
                assert all(run.all_accepted for run in runs)
            total = len(expected) + 5
            while gateway.ledger.delivered < 2 * total:
                await trio.sleep(0.02)
            gateway.shutdown()
    assert sink.stored == total + 5 and sink.duplicates == total - 5
    messages = await read_stream(nats_server, "IDS", "ids.in", total + 5)
    assert len(messages) == total + 5
    with_ids = {m.headers["Nats-Msg-Id"]: m.data for m in messages}
    assert expected <= with_ids.keys()
    assert with_ids["b:7"] == with_ids["u:7"] == with_ids["h:7"] == make_payload(24, 7)
    assert with_ids["n:30:4"] == make_payload(24, 34)
