"""Unary calls answered inline (no task per call): every way a request can come in pieces, or
not at all, still gets the answer the task path gives. A raw HTTP/2 client (h2) controls what
is sent when; grpcio and grpclib cover the ordinary calls in test_grpc.py."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
from grpclib.health.v1 import health_pb2
from test_grpc import GATEWAY, serving
from test_grpc_compression import Response, _pump, frame

from trio_gateway._proto import gateway_pb2, model_pb2
from trio_gateway.sources.grpc._connection import Connection


class Client:
    """One HTTP/2 connection, driven step by step."""

    def __init__(self, stream: trio.SocketStream, *, window: int = 1 << 24) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def headers(
        self, stream_id: int, port: int, *extra: tuple[str, str], path: str = GATEWAY + "Send"
    ) -> None:
        self.conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", f"127.0.0.1:{port}"),
                (":path", path),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *extra,
            ],
        )
        await self.flush()

    async def read_by_server(self) -> None:
        """Return once the server has read everything sent so far: a PING sent after it is
        answered only after the reads before it were handled. So what is sent next comes in
        a read of its own, however slow the server is."""
        self.conn.ping(b"readsync")
        await self.flush()
        with trio.fail_after(5):
            while True:
                data = await self.stream.receive_some(65536)
                assert data, "the server closed the connection"
                events = self.conn.receive_data(data)
                await self.flush()
                if any(isinstance(event, h2.events.PingAckReceived) for event in events):
                    return

    async def message(self, stream_id: int, sequence: int, *, end: bool = True) -> None:
        body = gateway_pb2.Message(payload=b"p%d" % sequence, sequence=sequence)
        self.conn.send_data(
            stream_id, frame(body.SerializeToString(), compressed=False), end_stream=end
        )
        await self.flush()

    async def response(self) -> Response:
        response = Response()
        with trio.fail_after(5):
            while not await _pump(self.stream, self.conn, response):
                pass
        return response


def ack(response: Response) -> gateway_pb2.Ack:
    assert response.status == 0, response
    return gateway_pb2.Ack.FromString(response.data[5:])


async def test_headers_and_data_in_separate_reads_are_answered() -> None:
    async with serving(grace_period=0.1) as served:
        client = Client(await trio.open_tcp_stream("127.0.0.1", served.port))
        await client.headers(1, served.port)
        await client.read_by_server()  # the server reads the HEADERS alone
        await client.message(1, 7)
        assert ack(await client.response()).sequence == 7
        assert served.payloads() == [b"p7"]


async def test_a_deadline_is_kept_while_the_request_does_not_come() -> None:
    async with serving(grace_period=0.1) as served:
        client = Client(await trio.open_tcp_stream("127.0.0.1", served.port))
        await client.headers(1, served.port, ("grpc-timeout", "200m"))
        with trio.fail_after(2):
            response = await client.response()
        assert response.status == 4  # DEADLINE_EXCEEDED


async def test_a_call_reset_before_its_request_is_forgotten() -> None:
    # If the waiting call stayed, the connection would never be idle: it is, and goes.
    async with serving(idle_timeout=0.3, grace_period=0.1) as served:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        client = Client(stream)
        await client.headers(1, served.port)
        await client.read_by_server()  # the call waits for its request, without a task
        client.conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        await client.flush()
        await client.headers(3, served.port)
        await client.message(3, 3)
        response = Response()
        with trio.fail_after(5):
            while not await _pump(stream, client.conn, response):
                pass
        assert ack(response).sequence == 3
        goaway = False
        with trio.fail_after(5):
            while data := await stream.receive_some(65536):
                for event in client.conn.receive_data(data):
                    goaway = goaway or isinstance(event, h2.events.ConnectionTerminated)
        assert goaway
        assert served.ingress.counters.rejected["idle_timeout"] == 1


async def test_a_request_without_end_stream_is_answered() -> None:
    async with serving(grace_period=0.1) as served:
        client = Client(await trio.open_tcp_stream("127.0.0.1", served.port))
        await client.headers(1, served.port)
        await client.message(1, 5, end=False)  # one message, then nothing (not valid unary)
        response = await client.response()
        assert ack(response).sequence == 5
        assert served.payloads() == [b"p5"]


async def test_the_reply_waits_for_the_clients_window() -> None:
    async with serving(grace_period=0.1) as served:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        client = Client(stream, window=0)  # the server may send no DATA until we say so
        await client.headers(1, served.port)
        await client.message(1, 9)
        response = Response()
        with trio.fail_after(5):
            while not response.headers:
                assert not await _pump(stream, client.conn, response)
        assert not response.data  # the headers came, the reply waits for the window
        client.conn.increment_flow_control_window(64, stream_id=1)
        await client.flush()
        with trio.fail_after(5):
            while not await _pump(stream, client.conn, response):
                pass
        assert ack(response).sequence == 9
        assert served.payloads() == [b"p9"]


async def test_every_unary_service_is_answered_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send, the talk's MakeRequest and health Check: no call gets a task of its own."""
    tasks: list[str] = []
    run_call = Connection._run_call

    async def spy(self: Connection, stream: object, reply: object = None) -> None:
        tasks.append(stream._call.path)  # type: ignore[attr-defined]
        await run_call(self, stream, reply)  # type: ignore[arg-type]

    monkeypatch.setattr(Connection, "_run_call", spy)
    cases = [
        (GATEWAY + "Send", gateway_pb2.Message(payload=b"p1", sequence=1), gateway_pb2.Ack),
        (
            "/model.GrpcUnaryInputterService/MakeRequest",
            model_pb2.Request(message="talk"),
            model_pb2.Empty,
        ),
        (
            "/grpc.health.v1.Health/Check",
            health_pb2.HealthCheckRequest(service=""),
            health_pb2.HealthCheckResponse,
        ),
    ]
    async with serving(grace_period=0.1) as served:
        client = Client(await trio.open_tcp_stream("127.0.0.1", served.port))
        replies = []
        for stream_id, (path, request, reply_type) in zip((1, 3, 5), cases, strict=True):
            await client.headers(stream_id, served.port, path=path)
            body = frame(request.SerializeToString(), compressed=False)
            client.conn.send_data(stream_id, body, end_stream=True)
            await client.flush()
            response = await client.response()
            assert response.status == 0, response
            replies.append(reply_type.FromString(response.data[5:]))
        assert served.payloads() == [b"p1", b"talk"]
    assert tasks == []
    assert replies[0].sequence == 1 and replies[0].accepted
    assert replies[2].status == health_pb2.HealthCheckResponse.SERVING
