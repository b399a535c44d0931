"""Drive the sans-IO gRPC protocol with bytes alone: an h2 client connection makes them."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
from grpclib.const import Cardinality, Handler

from trio_gateway._proto import gateway_pb2
from trio_gateway.sources.grpc._calls import Call, CallChanged
from trio_gateway.sources.grpc._events import CallStarted, Event
from trio_gateway.sources.grpc._limits import ServerLimits
from trio_gateway.sources.grpc._protocol import GrpcProtocol

SEND = "/trio_gateway.v1.Gateway/Send"
STREAM = "/trio_gateway.v1.Gateway/Stream"
PUBLIC = "/grpc.health.v1.Health/Check"


async def _never(stream: Any) -> None:
    raise AssertionError("the protocol never runs a handler")


ROUTES = {
    SEND: Handler(_never, Cardinality.UNARY_UNARY, gateway_pb2.Message, gateway_pb2.Ack),
    STREAM: Handler(_never, Cardinality.STREAM_UNARY, gateway_pb2.Message, gateway_pb2.Ack),
    PUBLIC: Handler(_never, Cardinality.UNARY_UNARY, gateway_pb2.Message, gateway_pb2.Ack),
}
TOKEN = "Bearer s3cret"


def message(payload: bytes, *, compressed: bool = False) -> bytes:
    """One gRPC message: the 5-byte prefix and the body (gzipped if ``compressed``)."""
    body = gzip.compress(payload) if compressed else payload
    return bytes((int(compressed),)) + len(body).to_bytes(4, "big") + body


def request_headers(
    path: str = SEND, *, extra: Sequence[tuple[str, str]] = (), method: str = "POST"
) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", TOKEN),
        *extra,
    ]


class Wire:
    """A protocol under test and an h2 client talking to it through byte strings."""

    def __init__(self, limits: ServerLimits | None = None, *, handshake: bool = True) -> None:
        self.rejected: list[str] = []
        self.proto = GrpcProtocol(
            limits or ServerLimits(),
            routes=ROUTES,
            authorized=lambda path, auth: path == PUBLIC or auth == TOKEN,
            reject=self.rejected.append,
        )
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.client.initiate_connection()
        if handshake:  # the prefaces and settings, both ways
            self.send()
            self.answer()
            self.send()

    def send(self) -> list[Event]:
        """What the client has queued, into the protocol."""
        return self.proto.receive_data(self.client.data_to_send())

    def answer(self) -> list[h2.events.Event]:
        """What the protocol has queued, into the client (its settings chatter left out)."""
        events = self.client.receive_data(self.proto.data_to_send())
        quiet = (h2.events.RemoteSettingsChanged, h2.events.SettingsAcknowledged)
        return [e for e in events if not isinstance(e, quiet)]

    def call(
        self,
        stream_id: int,
        path: str = SEND,
        *,
        body: bytes | None = b"",
        end: bool = True,
        **kw: Any,
    ) -> list[Event]:
        self.client.send_headers(stream_id, request_headers(path, **kw))
        if body is not None:
            self.client.send_data(stream_id, body, end_stream=end)
        return self.send()


def first_call(events: list[Event]) -> Call:
    """The call of the first CallStarted event."""
    return next(e.call for e in events if isinstance(e, CallStarted))


def started(events: list[Event]) -> list[int]:
    return [e.call.stream_id for e in events if isinstance(e, CallStarted)]


def changed(events: list[Event]) -> list[int]:
    return [e.call.stream_id for e in events if isinstance(e, CallChanged)]


def trailers(events: list[h2.events.Event]) -> dict[str, str]:
    """The headers of the response that ended a stream (trailers-only or trailers)."""
    for event in events:
        if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived) and (
            event.stream_ended is not None
        ):
            return dict(event.headers)  # type: ignore[arg-type]
    raise AssertionError(f"no final headers in {events}")
