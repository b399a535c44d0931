"""grpclib's asyncio client against a trio_gateway gRPC source; prints one JSON report.

    python tests/grpc_clients/grpclib_client.py PORT

Run as a subprocess by tests/integration/test_grpc_gateway.py (asyncio must not share the test's
process).
"""

from __future__ import annotations

import asyncio
import json
import sys

from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from grpclib.health.v1 import health_grpc, health_pb2

from trio_gateway._proto import gateway_grpc, gateway_pb2, model_grpc, model_pb2


async def main(port: int) -> dict[str, object]:
    report: dict[str, object] = {}
    async with Channel("127.0.0.1", port) as channel:
        gateway = gateway_grpc.GatewayStub(channel)
        ack = await gateway.Send(gateway_pb2.Message(payload=b"u" * 81920, sequence=1), timeout=5)
        report["unary"] = [ack.accepted, ack.sequence]

        async with gateway.Stream.open(timeout=15) as stream:
            for start in range(0, 10_000, 500):
                batch = [
                    gateway_pb2.Message(payload=b"s%d" % i, sequence=i)
                    for i in range(start, start + 500)
                ]
                for message in batch[:-1]:
                    await stream.send_message(message)
                await stream.send_message(batch[-1], end=start + 500 == 10_000)
            ack = await stream.recv_message()
        report["stream"] = [ack.accepted_count, ack.rejected_count]

        async with gateway.StreamAcked.open(timeout=10) as bidi:
            for i in range(100):
                await bidi.send_message(gateway_pb2.Message(payload=b"b%d" % i, sequence=i))
            await bidi.end()
            report["bidi"] = [(a.sequence, a.accepted) async for a in bidi]

        await model_grpc.GrpcUnaryInputterServiceStub(channel).MakeRequest(
            model_pb2.Request(message="talk-unary"), timeout=5
        )
        async with model_grpc.GrpcStreamingInputterServiceStub(channel).MakeRequest.open(
            timeout=5
        ) as talk:
            await talk.send_message(model_pb2.Request(message="talk-1"))
            await talk.send_message(model_pb2.Request(message="talk-2"), end=True)
            await talk.recv_message()
        report["talk"] = True

        health = await health_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        report["health"] = health.status

        try:
            await gateway.Send(gateway_pb2.Message(payload=b"x" * 5_000_000), timeout=5)
        except GRPCError as exc:
            report["oversize"] = exc.status.name
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
