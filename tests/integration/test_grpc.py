"""GrpcSource against real clients: grpcio (sync, in a worker thread) on loopback, port 0."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import grpc
import helpers
import pytest
import trio
import trustme
from grpclib.const import Cardinality, Handler
from grpclib.health.v1 import health_pb2
from helpers import wait_until

from trio_gateway._errors import ConfigurationError
from trio_gateway._proto import gateway_pb2, model_pb2
from trio_gateway.sources.grpc import GrpcSource, GrpcStream

T = TypeVar("T")
GATEWAY = "/trio_gateway.v1.Gateway/"
UNARY_MODEL = "/model.GrpcUnaryInputterService/MakeRequest"
STREAM_MODEL = "/model.GrpcStreamingInputterService/MakeRequest"
HEALTH = "/grpc.health.v1.Health/"


serving = partial(helpers.serving, GrpcSource)


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def unary(channel: grpc.Channel, path: str, reply: Any) -> Any:
    return channel.unary_unary(
        path, request_serializer=_serialize, response_deserializer=reply.FromString
    )


def stream_unary(channel: grpc.Channel, path: str, reply: Any) -> Any:
    return channel.stream_unary(
        path, request_serializer=_serialize, response_deserializer=reply.FromString
    )


def stream_stream(channel: grpc.Channel, path: str, reply: Any) -> Any:
    return channel.stream_stream(
        path, request_serializer=_serialize, response_deserializer=reply.FromString
    )


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


# -- the gateway's own service ------------------------------------------------------------------


async def test_unary_send_80kb_arrives_byte_exact() -> None:
    payload = bytes(range(256)) * 320  # 81,920 bytes
    async with serving() as served:

        def call() -> Any:
            with grpc.insecure_channel(served.target) as channel:
                send = unary(channel, GATEWAY + "Send", gateway_pb2.Ack)
                return send(gateway_pb2.Message(payload=payload, sequence=7), timeout=5)

        ack = await in_thread(call)
        assert (ack.accepted, ack.sequence, ack.accepted_count) == (True, 7, 1)
        assert served.payloads() == [payload]
        origin = served.queue.statistics()
        assert origin.put == 1
        assert served.ingress.counters.received_bytes == len(payload)


@pytest.mark.slow
async def test_stream_of_10000_messages_in_order() -> None:
    async with serving() as served:

        def call() -> Any:
            with grpc.insecure_channel(served.target) as channel:
                stream = stream_unary(channel, GATEWAY + "Stream", gateway_pb2.Ack)
                messages = (
                    gateway_pb2.Message(payload=b"m%d" % i, sequence=i) for i in range(10_000)
                )
                return stream(messages, timeout=15)

        ack = await in_thread(call)
        assert (ack.accepted_count, ack.rejected_count, ack.sequence) == (10_000, 0, 9_999)
        assert served.payloads() == [b"m%d" % i for i in range(10_000)]


async def test_200_concurrent_unary_calls() -> None:
    async with serving(max_concurrent_streams=16) as served:

        def call() -> list[int]:
            with grpc.insecure_channel(served.target) as channel:
                send = unary(channel, GATEWAY + "Send", gateway_pb2.Ack)
                futures = [
                    send.future(gateway_pb2.Message(payload=b"x" * i, sequence=i), timeout=10)
                    for i in range(200)
                ]
                return sorted(f.result().sequence for f in futures)

        assert await in_thread(call) == list(range(200))
        assert sorted(map(len, served.payloads())) == list(range(200))
        assert served.ingress.counters.connections_total == 1


async def test_bidi_acks_match_sends_one_to_one() -> None:
    async with serving(capacity=600, queue_timeout=0.0) as served:

        def call() -> list[Any]:
            with grpc.insecure_channel(served.target) as channel:
                acked = stream_stream(channel, GATEWAY + "StreamAcked", gateway_pb2.Ack)
                messages = (gateway_pb2.Message(payload=b"%d" % i, sequence=i) for i in range(1000))
                return list(acked(messages, timeout=10))

        acks = await in_thread(call)
        assert [a.sequence for a in acks] == list(range(1000))
        assert all(a.accepted and not a.reason for a in acks[:600])
        assert all(not a.accepted and a.reason == "queue_full" for a in acks[600:])
        assert served.payloads() == [b"%d" % i for i in range(600)]
        assert served.ingress.counters.rejected["queue_full"] == 400


async def test_client_streaming_full_queue_closes_the_window() -> None:
    """Under `block`, a full queue stops the reads: the client cannot push its whole stream."""
    count, size = 3000, 1024
    async with serving(capacity=10) as served:
        result: list[Any] = []

        def call() -> None:
            with grpc.insecure_channel(served.target) as channel:
                stream = stream_unary(channel, GATEWAY + "Stream", gateway_pb2.Ack)
                messages = (
                    gateway_pb2.Message(payload=i.to_bytes(4, "big") * (size // 4), sequence=i)
                    for i in range(count)
                )
                result.append(stream(messages, timeout=15))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, call)
            # the handler is parked on the full queue; the window let through at most ~1 MiB
            await wait_until(lambda: served.queue.statistics().waiting_producers == 1)
            assert len(served.queue) == 10
            assert served.ingress.counters.received < count // 2
            received: list[bytes] = []
            while len(received) < count:
                batch = await served.queue.get_batch(100)
                received.extend(batch)
        assert result[0].accepted_count == count
        assert received == [i.to_bytes(4, "big") * (size // 4) for i in range(count)]
        assert served.ingress.counters.abandoned == 0


# -- statuses -----------------------------------------------------------------------------------


async def test_oversize_message_is_resource_exhausted() -> None:
    async with serving(max_message_size=1000) as served:

        def call() -> grpc.RpcError:
            with grpc.insecure_channel(served.target) as channel:
                send = unary(channel, GATEWAY + "Send", gateway_pb2.Ack)
                return rpc_error(lambda: send(gateway_pb2.Message(payload=b"x" * 2000), timeout=5))

        error = await in_thread(call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert served.ingress.counters.rejected["oversize"] == 1
        assert served.payloads() == []


async def test_full_queue_is_resource_exhausted_for_unary() -> None:
    async with serving(capacity=1, queue_timeout=0.05) as served:

        def call() -> tuple[Any, grpc.RpcError, grpc.RpcError]:
            with grpc.insecure_channel(served.target) as channel:
                send = unary(channel, GATEWAY + "Send", gateway_pb2.Ack)
                model = unary(channel, UNARY_MODEL, model_pb2.Empty)
                first = send(gateway_pb2.Message(payload=b"a"), timeout=5)
                second = rpc_error(lambda: send(gateway_pb2.Message(payload=b"b"), timeout=5))
                talk = rpc_error(lambda: model(model_pb2.Request(message="c"), timeout=5))
                return first, second, talk

        first, second, talk = await in_thread(call)
        assert first.accepted
        assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert talk.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert served.ingress.counters.rejected["queue_full"] == 2
        assert served.payloads() == [b"a"]


async def test_invalid_protobuf_is_invalid_argument() -> None:
    async with serving() as served:

        def call() -> tuple[grpc.RpcError, grpc.RpcError]:
            with grpc.insecure_channel(served.target) as channel:
                send = unary(channel, GATEWAY + "Send", gateway_pb2.Ack)
                stream = stream_unary(channel, GATEWAY + "Stream", gateway_pb2.Ack)
                bad = b"\x0a\xff\xff"  # field 1, length 2^14+: truncated
                good = gateway_pb2.Message(payload=b"ok").SerializeToString()
                return (
                    rpc_error(lambda: send(bad, timeout=5)),
                    rpc_error(lambda: stream(iter([good, bad]), timeout=5)),
                )

        unary_error, stream_error = await in_thread(call)
        assert unary_error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stream_error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert served.ingress.counters.rejected["malformed"] == 2
        assert served.payloads() == [b"ok"]


async def test_unknown_method_is_unimplemented() -> None:
    async with serving() as served:

        def call() -> grpc.RpcError:
            with grpc.insecure_channel(served.target) as channel:
                nope = unary(channel, "/trio_gateway.v1.Gateway/Nope", gateway_pb2.Ack)
                return rpc_error(lambda: nope(gateway_pb2.Message(), timeout=5))

        assert (await in_thread(call)).code() == grpc.StatusCode.UNIMPLEMENTED


async def test_bearer_token_is_required_except_for_health() -> None:
    async with serving(token="s3cret") as served:

        def call() -> tuple[grpc.RpcError, grpc.RpcError, Any, Any]:
            with grpc.insecure_channel(served.target) as channel:
                send = unary(channel, GATEWAY + "Send", gateway_pb2.Ack)
                check = unary(channel, HEALTH + "Check", health_pb2.HealthCheckResponse)
                message = gateway_pb2.Message(payload=b"p")
                return (
                    rpc_error(lambda: send(message, timeout=5)),
                    rpc_error(
                        lambda: send(message, timeout=5, metadata=[("authorization", "Bearer no")])
                    ),
                    send(message, timeout=5, metadata=[("authorization", "Bearer s3cret")]),
                    check(health_pb2.HealthCheckRequest(), timeout=5),
                )

        missing, wrong, ok, health = await in_thread(call)
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ok.accepted
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert served.ingress.counters.rejected["unauthorized"] == 2
        assert served.payloads() == [b"p"]


async def test_deadline_exceeded_cancels_the_handler() -> None:
    """A stream parked on a full queue is cancelled at its grpc-timeout."""
    async with serving(capacity=1) as served:
        served.queue.put_nowait(b"filler")

        def call() -> grpc.RpcError:
            with grpc.insecure_channel(served.target) as channel:
                stream = stream_unary(channel, GATEWAY + "Stream", gateway_pb2.Ack)
                messages = [gateway_pb2.Message(payload=b"late", sequence=i) for i in range(3)]
                return rpc_error(lambda: stream(iter(messages), timeout=0.3))

        error = await in_thread(call)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the handler's offer was cancelled: what it held is abandoned (1-3 messages, depending
        # on how grpcio split them into DATA frames), nothing reached the queue
        with trio.fail_after(2):
            while served.ingress.counters.abandoned < 1:
                await trio.sleep(0.01)
        assert len(served.queue) == 1


async def test_client_cancel_resets_the_stream_and_cancels_the_handler() -> None:
    async with serving(capacity=1) as served:
        served.queue.put_nowait(b"filler")
        release = threading.Event()

        def call() -> bool:
            with grpc.insecure_channel(served.target) as channel:
                stream = stream_unary(channel, GATEWAY + "Stream", gateway_pb2.Ack)

                def messages() -> Iterator[Any]:
                    yield gateway_pb2.Message(payload=b"x")
                    release.wait(5)

                future = stream.future(messages(), timeout=10)
                time.sleep(0.3)
                cancelled: bool = future.cancel()
                release.set()
                return cancelled

        assert await in_thread(call)
        with trio.fail_after(2):
            while served.ingress.counters.abandoned < 1:
                await trio.sleep(0.01)


# -- the talk's services, health, TLS -----------------------------------------------------------


async def test_the_talks_services_are_answered() -> None:
    async with serving() as served:

        def call() -> tuple[Any, Any]:
            with grpc.insecure_channel(served.target) as channel:
                make = unary(channel, UNARY_MODEL, model_pb2.Empty)
                stream = stream_unary(channel, STREAM_MODEL, model_pb2.Empty)
                one = make(model_pb2.Request(message="héllo"), timeout=5)
                many = stream((model_pb2.Request(message=f"s{i}") for i in range(100)), timeout=5)
                return one, many

        one, many = await in_thread(call)
        assert isinstance(one, model_pb2.Empty) and isinstance(many, model_pb2.Empty)
        assert served.payloads() == ["héllo".encode(), *(f"s{i}".encode() for i in range(100))]


async def test_health_check_and_watch_flip_to_not_serving_when_draining() -> None:
    async with serving() as served:
        watched: list[int] = []
        first_seen = threading.Event()

        def check(service: str = "") -> Any:
            with grpc.insecure_channel(served.target) as channel:
                check = unary(channel, HEALTH + "Check", health_pb2.HealthCheckResponse)
                return check(health_pb2.HealthCheckRequest(service=service), timeout=5)

        def watch() -> None:
            with grpc.insecure_channel(served.target) as channel:
                watch = channel.unary_stream(
                    HEALTH + "Watch",
                    request_serializer=_serialize,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                for reply in watch(health_pb2.HealthCheckRequest(), timeout=10):
                    watched.append(reply.status)
                    first_seen.set()

        assert (await in_thread(check)).status == health_pb2.HealthCheckResponse.SERVING
        gateway = await in_thread(lambda: check("trio_gateway.v1.Gateway"))
        assert gateway.status == health_pb2.HealthCheckResponse.SERVING
        unknown = await in_thread(lambda: rpc_error(lambda: check("nope")))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, watch)
            await in_thread(lambda: first_seen.wait(5))
            served.stop()
        assert watched == [
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        ]


async def test_tls_with_alpn_h2() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    async with serving(ssl_context=context) as served:

        def call() -> Any:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
            with grpc.secure_channel(f"localhost:{served.port}", credentials) as channel:
                send = unary(channel, GATEWAY + "Send", gateway_pb2.Ack)
                return send(gateway_pb2.Message(payload=b"secret", sequence=1), timeout=5)

        assert (await in_thread(call)).accepted
        assert served.payloads() == [b"secret"]


# -- your own services on the same server, concurrency limit ------------------------------------


class _Slow:
    """A grpclib-style service (``__mapping__``) that tracks how many calls run at once."""

    def __init__(self) -> None:
        self.active = self.peak = 0

    async def echo(self, stream: GrpcStream) -> None:
        request = await stream.recv_message()
        self.active += 1
        self.peak = max(self.peak, self.active)
        await trio.sleep(0.02)
        self.active -= 1
        await stream.send_message(request)

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/test.Slow/Echo": Handler(
                self.echo, Cardinality.UNARY_UNARY, model_pb2.Request, model_pb2.Request
            )
        }


async def test_extra_services_and_max_concurrent_streams() -> None:
    slow = _Slow()
    async with serving(max_concurrent_streams=4, services=[slow]) as served:

        def call() -> list[str]:
            with grpc.insecure_channel(served.target) as channel:
                echo = unary(channel, "/test.Slow/Echo", model_pb2.Request)
                futures = [echo.future(model_pb2.Request(message=str(i))) for i in range(40)]
                return [f.result(timeout=10).message for f in futures]

        assert await in_thread(call) == [str(i) for i in range(40)]
        assert slow.peak == 4


def test_configuration_errors_name_the_key() -> None:
    with pytest.raises(ConfigurationError) as info:
        GrpcSource(max_concurrent_streams=0)
    assert info.value.key == "grpc.max_concurrent_streams"
    with pytest.raises(ConfigurationError) as info:
        GrpcSource(token="")
    assert info.value.key == "grpc.token"
