"""The services a :class:`GrpcSource` serves: the gateway's own, the talk's, and health.

Each is a grpclib-generated ``*Base`` subclass, so the server finds its methods through
``__mapping__()``. They run on :class:`GrpcStream` (our h2 server) and use its batch API on the
streaming paths: every complete message of one read goes to the queue in one offer.

Ids (docs/grpc.md): with ``idempotency-key: K`` metadata, a unary call's message has the id
``K``; a stream's messages ``K:<sequence>`` (``gateway.v1.Message.sequence``, which the client
chooses and keeps when it resends), or ``K:<position>`` on the talk's stream, which has no
sequence. A call with the key skips the inline path (one origin per message is its cost).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import trio
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1 import health_pb2
from grpclib.health.v1.health_grpc import HealthBase

from ..._ingress import NOT_DELIVERED, Ingress
from ..._message import Origin
from ..._proto import gateway_pb2, model_pb2
from ..._proto.gateway_grpc import GatewayBase
from ..._proto.model_grpc import (
    GrpcStreamingInputterServiceBase,
    GrpcUnaryInputterServiceBase,
)
from ..._wire import GRPC_METHODS, GRPC_SERVICE, MAX_KEY_LENGTH, idempotency_key
from .._flight import Flight
from ._server import InlineHandler
from ._stream import GrpcStream

__all__ = (
    "GatewayService",
    "HealthService",
    "StreamingInputterService",
    "UnaryInputterService",
)

_QUEUE_FULL = "queue_full"
_EMPTY = model_pb2.Empty()
_ServingStatus: TypeAlias = "health_pb2.HealthCheckResponse.ServingStatus.ValueType"


def _origin(ingress: Ingress, stream: GrpcStream, message_id: str | None = None) -> Origin:
    return Origin("grpc", ingress.listener, stream.peer, time.time(), message_id)


def _key(stream: GrpcStream) -> str | None:
    """The call's ``idempotency-key``, or None; INVALID_ARGUMENT when it is not a key."""
    raw = stream.idempotency_key
    if raw is None:
        return None
    key = idempotency_key(raw)
    if key is None:
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"idempotency-key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters",
        )
    return key


def _decode_all(
    ingress: Ingress, message_type: Any, batch: Sequence[bytes]
) -> tuple[list[Any], GRPCError | None]:
    """Decode a batch; on a bad message, return the good prefix and the error to raise after."""
    parse = message_type.FromString
    try:
        return [parse(data) for data in batch], None
    except DecodeError:
        good = []
        for data in batch:
            try:
                good.append(parse(data))
            except DecodeError:
                break
        ingress.reject("malformed")
        return good, GRPCError(Status.INVALID_ARGUMENT, "invalid protobuf message")


def _payloads(
    ingress: Ingress, batch: Sequence[bytes]
) -> tuple[list[bytes], list[int], GRPCError | None]:
    """The payloads and sequence numbers of a batch of ``gateway.v1.Message`` (the decoded
    messages are dropped at once: a payload is the one copy kept), and the error to raise
    after them if one was invalid."""
    messages, error = _decode_all(ingress, gateway_pb2.Message, batch)
    return [m.payload for m in messages], [m.sequence for m in messages], error


async def _offer_one(ingress: Ingress, stream: GrpcStream, payload: bytes, wait: float) -> None:
    origin = _origin(ingress, stream, _key(stream))
    answer = await ingress.offer_or_reject_later([payload], origin, timeout=wait)
    if await answer.wait():
        return
    if answer.accepted:  # queued, and the sink did not confirm it (ack = "delivered")
        raise GRPCError(Status.UNAVAILABLE, "not delivered: the destination did not take it")
    raise GRPCError(Status.RESOURCE_EXHAUSTED, "the gateway's queue is full")


class GatewayService(GatewayBase):
    """``trio_gateway.v1.Gateway``: Send, Stream and StreamAcked."""

    def __init__(self, ingress: Ingress, *, queue_timeout: float) -> None:
        self._ingress = ingress
        self._timeout = queue_timeout

    def __inline_mapping__(self) -> dict[str, InlineHandler]:
        return {GRPC_SERVICE + GRPC_METHODS["unary"]: self._send_inline}

    def _send_inline(self, stream: GrpcStream, message: Any) -> Any:
        """``Send`` when the queue has room now (the server's inline path); else ``None``, and
        :meth:`Send` waits for room or answers RESOURCE_EXHAUSTED."""
        if stream.idempotency_key is not None:
            return None
        if not self._ingress.offer_one_nowait(message.payload, _origin(self._ingress, stream)):
            return None
        return gateway_pb2.Ack(sequence=message.sequence, accepted=True, accepted_count=1)

    async def Send(self, stream: GrpcStream) -> None:  # type: ignore[override]
        message = await stream.recv_message()
        if message is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
        await _offer_one(self._ingress, stream, message.payload, self._timeout)
        await stream.send_message(
            gateway_pb2.Ack(sequence=message.sequence, accepted=True, accepted_count=1)
        )

    async def Stream(self, stream: GrpcStream) -> None:  # type: ignore[override]
        ingress = self._ingress
        key = _key(stream)
        accepted = received = last_sequence = 0
        while batch := await stream.recv_batch():
            payloads, sequences, error = _payloads(ingress, batch)
            del batch  # only the payloads go on: a waiting handler holds one copy of each
            if payloads:
                received += len(payloads)
                last_sequence = sequences[-1]
                # under `block` this waits while the queue is full: the window stays closed
                ids = None if key is None else [f"{key}:{s}" for s in sequences]
                accepted += await ingress.offer(payloads, _origin(ingress, stream), ids=ids)
                del payloads
            if error is not None:
                raise error
        await stream.send_message(
            gateway_pb2.Ack(
                sequence=last_sequence,
                accepted=accepted == received,
                accepted_count=accepted,
                rejected_count=received - accepted,
            )
        )

    async def StreamAcked(self, stream: GrpcStream) -> None:  # type: ignore[override]
        """An Ack per message, in order. A read whose answer waits (``ack = "delivered"``, a
        disk queue) goes in flight and the stream is read on meanwhile; one task sends each
        read's acks once it is answered (:class:`~.._flight.Flight`: bounded in messages and
        bytes, its bookkeeping charged to the connection's share of the memory budget)."""
        flight: Flight[tuple[list[int], int]] = Flight(
            hold=stream.hold_answers, release=stream.release_answers
        )
        failure: Exception | None = None

        async def send_acks(read: tuple[list[int], int], delivered: int) -> None:
            sequences, queued = read  # queued: what the queue took; delivered: confirmed
            ack = gateway_pb2.Ack
            acks = [ack(sequence=s, accepted=True, accepted_count=1) for s in sequences[:delivered]]
            acks.extend(
                ack(sequence=s, reason=NOT_DELIVERED, rejected_count=1)
                for s in sequences[delivered:queued]
            )
            acks.extend(
                ack(sequence=s, reason=_QUEUE_FULL, rejected_count=1) for s in sequences[queued:]
            )
            await stream.send_messages(acks)

        async def answer_in_order() -> None:
            nonlocal failure
            try:
                await flight.answer_in_order(send_acks)
            except Exception as exc:  # raised by the handler as itself, not in a group
                failure = failure or exc
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_in_order)
            try:
                await self._acked_reads(stream, flight, send_acks)
                await flight.wait_answered()
            except Exception as exc:
                failure = failure or exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _acked_reads(
        self,
        stream: GrpcStream,
        flight: Flight[tuple[list[int], int]],
        send_acks: Callable[[tuple[list[int], int], int], Awaitable[None]],
    ) -> None:
        """StreamAcked's reads: offer each, and ack it at once if its answer is final and
        none is in flight, else put it in flight. A bad message ends the stream with
        INVALID_ARGUMENT once the messages before it are answered."""
        ingress = self._ingress
        key = _key(stream)
        while batch := await stream.recv_batch():
            payloads, sequences, error = _payloads(ingress, batch)
            del batch
            if payloads:
                ids = None if key is None else [f"{key}:{s}" for s in sequences]
                answer = await ingress.offer_or_reject_later(
                    payloads, _origin(ingress, stream), timeout=self._timeout, ids=ids
                )
                n, nbytes = len(payloads), sum(map(len, payloads))
                del payloads  # queued or refused: not held while the acks wait
                read = (sequences, answer.accepted)
                if answer.final and not flight:
                    await send_acks(read, answer.accepted)
                else:
                    await flight.add(answer, n, nbytes, read)
            if error is not None:
                await flight.wait_answered()
                raise error


class UnaryInputterService(GrpcUnaryInputterServiceBase):
    """The talk's ``model.GrpcUnaryInputterService``: the payload is ``message`` as UTF-8."""

    def __init__(self, ingress: Ingress, *, queue_timeout: float) -> None:
        self._ingress = ingress
        self._timeout = queue_timeout

    def __inline_mapping__(self) -> dict[str, InlineHandler]:
        return {"/model.GrpcUnaryInputterService/MakeRequest": self._make_request_inline}

    def _make_request_inline(self, stream: GrpcStream, request: Any) -> Any:
        """``MakeRequest`` when the queue has room now; else ``None`` (the task path)."""
        if stream.idempotency_key is not None:
            return None
        payload = request.message.encode()
        if not self._ingress.offer_one_nowait(payload, _origin(self._ingress, stream)):
            return None
        return _EMPTY

    async def MakeRequest(self, stream: GrpcStream) -> None:  # type: ignore[override]
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
        await _offer_one(self._ingress, stream, request.message.encode(), self._timeout)
        await stream.send_message(model_pb2.Empty())


class StreamingInputterService(GrpcStreamingInputterServiceBase):
    """The talk's ``model.GrpcStreamingInputterService``: one Empty when the client is done."""

    def __init__(self, ingress: Ingress) -> None:
        self._ingress = ingress

    async def MakeRequest(self, stream: GrpcStream) -> None:  # type: ignore[override]
        ingress = self._ingress
        key = _key(stream)
        position = 0
        while batch := await stream.recv_batch():
            requests, error = _decode_all(ingress, model_pb2.Request, batch)
            if requests:
                ids = None
                if key is not None:
                    ids = [f"{key}:{n}" for n in range(position, position + len(requests))]
                    position += len(requests)
                await ingress.offer(
                    [r.message.encode() for r in requests], _origin(ingress, stream), ids=ids
                )
            if error is not None:
                raise error
        await stream.send_message(model_pb2.Empty())


class HealthService(HealthBase):
    """``grpc.health.v1.Health``: SERVING, or NOT_SERVING once the gateway is draining.

    ``""`` names the whole server; the other known names are the services served here.
    ``Watch`` sends the current status, then NOT_SERVING when draining starts, then ends.
    """

    def __init__(self, ingress: Ingress, services: Sequence[str]) -> None:
        self._ingress = ingress
        self._services = frozenset(("", *services))

    def __inline_mapping__(self) -> dict[str, InlineHandler]:
        return {"/grpc.health.v1.Health/Check": self._check_inline}

    def _check_inline(self, stream: GrpcStream, request: Any) -> Any:
        """``Check`` for a known service (an unknown one takes the task path: NOT_FOUND)."""
        if request.service not in self._services:
            return None
        return health_pb2.HealthCheckResponse(status=self._status(request.service))

    def _status(self, service: str) -> _ServingStatus:
        if service not in self._services:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self._ingress.stopping:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    async def Check(self, stream: GrpcStream) -> None:  # type: ignore[override]
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
        if request.service not in self._services:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {request.service!r}")
        await stream.send_message(
            health_pb2.HealthCheckResponse(status=self._status(request.service))
        )

    async def Watch(self, stream: GrpcStream) -> None:  # type: ignore[override]
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
        status = self._status(request.service)
        await stream.send_message(health_pb2.HealthCheckResponse(status=status))
        if status == health_pb2.HealthCheckResponse.SERVING:
            await self._ingress.wait_stopping()
            await stream.send_message(
                health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
            )
        else:
            await self._ingress.wait_stopping()
