"""The sans-IO HTTP/2 + gRPC layer, driven with bytes alone (no sockets, no trio)."""

from __future__ import annotations

import ast
import gzip
from pathlib import Path
from typing import cast

import h2.events
import pytest
from grpc_protocol_kit import (
    PUBLIC,
    SEND,
    STREAM,
    Wire,
    changed,
    first_call,
    message,
    request_headers,
    started,
    trailers,
)
from grpclib.const import Status
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, PingFrame

from trio_gateway._proto import gateway_pb2
from trio_gateway.sources.grpc._calls import Call
from trio_gateway.sources.grpc._events import (
    CallStarted,
    ConnectionBroken,
    PeerGoingAway,
    PingAcked,
    WindowOpened,
)
from trio_gateway.sources.grpc._limits import ServerLimits
from trio_gateway.sources.grpc._protocol import DRAIN_PING, MAX_STREAM_ID

PACKAGE = Path(__file__).resolve().parents[2] / "trio_gateway"
SANS_IO = ("grpc/_protocol", "grpc/_events", "grpc/_calls", "grpc/_limits", "_http2")
"""The sans-IO modules under ``trio_gateway/sources``: the gRPC layer and the HTTP/2 one."""


def _local_imports(module: Path) -> tuple[set[Path], set[str]]:
    """The package modules ``module`` imports (resolved to files) and its other imports."""
    local: set[Path] = set()
    other: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            other.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            other.add(node.module or "")
        elif isinstance(node, ast.ImportFrom):
            base = module.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*(node.module or "").split(".")) if node.module else base
            candidates = [target.with_suffix(".py"), target / "__init__.py"]
            if not node.module:
                candidates += [base / f"{alias.name}.py" for alias in node.names]
            local.update(path for path in candidates if path.exists())
    return local, other


def test_the_protocol_layer_imports_no_trio_even_indirectly() -> None:
    todo = [PACKAGE / "sources" / f"{name}.py" for name in SANS_IO]
    seen: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        local, other = _local_imports(module)
        assert not any(name.split(".")[0] == "trio" for name in other), module
        todo.extend(local)
    names = {str(path.relative_to(PACKAGE)) for path in seen}
    names.discard("sources/_http2.py")
    assert not any(name.startswith(("sources/_", "_ingress", "_gateway")) for name in names)


def split_frames(data: bytes) -> list[Frame]:
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


def test_a_unary_call_from_headers_to_trailers() -> None:
    wire = Wire()
    request = gateway_pb2.Message(payload=b"hello", sequence=7).SerializeToString()
    events = wire.call(1, body=message(request), extra=[("grpc-timeout", "5S")])
    assert started(events) == [1] and changed(events) == [1]
    call = first_call(events)
    assert call.path == SEND and call.timeout == 5.0 and call.ended
    assert call.decode(call.pop()) == gateway_pb2.Message(payload=b"hello", sequence=7)
    reply = gateway_pb2.Ack(sequence=7, accepted=True).SerializeToString()
    wire.proto.send_headers(call)
    assert wire.proto.send_window(call) >= len(reply) + 5
    wire.proto.send_data(call, len(reply).to_bytes(5, "big") + reply)
    wire.proto.end_call(call)
    wire.proto.finish(call, Status.OK)
    answer = wire.answer()
    response = next(e for e in answer if isinstance(e, h2.events.ResponseReceived))
    assert dict(cast("list[tuple[str, str]]", response.headers))[":status"] == "200"
    data = [e for e in answer if isinstance(e, h2.events.DataReceived)]
    assert data[0].data == len(reply).to_bytes(5, "big") + reply
    assert trailers(answer) == {"grpc-status": "0"}
    assert wire.proto.calls == {} and wire.rejected == []


@pytest.mark.parametrize(
    ("path", "extra", "method", "status", "http"),
    [
        ("/nope/Nothing", [], "POST", Status.UNIMPLEMENTED, "200"),
        (SEND, [("grpc-encoding", "br")], "POST", Status.UNIMPLEMENTED, "200"),
        (SEND, [("grpc-timeout", "soon")], "POST", Status.INTERNAL, "200"),
        (SEND, [], "GET", None, "405"),
    ],
)
def test_a_bad_request_is_answered_by_the_protocol_itself(
    path: str, extra: list[tuple[str, str]], method: str, status: Status | None, http: str
) -> None:
    wire = Wire()
    assert wire.call(1, path, extra=extra, method=method) == []
    final = trailers(wire.answer())
    assert final[":status"] == http
    if status is not None:
        assert final["grpc-status"] == str(status.value)
    if extra and extra[0][0] == "grpc-encoding":
        assert final["grpc-accept-encoding"] == "identity,deflate,gzip"
    assert wire.proto.calls == {}


def test_the_bearer_token_is_checked_except_on_public_paths() -> None:
    wire = Wire()
    wire.client.send_headers(1, [h for h in request_headers() if h[0] != "authorization"])
    assert wire.send() == []
    assert trailers(wire.answer())["grpc-status"] == str(Status.UNAUTHENTICATED.value)
    assert wire.rejected == ["unauthorized"]
    wire.client.send_headers(3, [h for h in request_headers(PUBLIC) if h[0] != "authorization"])
    assert started(wire.send()) == [3]


def test_a_message_past_the_limit_fails_the_call_before_its_body_is_buffered() -> None:
    wire = Wire(ServerLimits(max_message_size=100))
    events = wire.call(1, STREAM, body=b"\x00" + (101).to_bytes(4, "big"), end=False)
    call = first_call(events)
    assert changed(events) == [1] and call.cancelled and call.buffered == 0
    assert call.error is not None and call.error.status is Status.RESOURCE_EXHAUSTED
    assert wire.rejected == ["oversize"]


def test_a_stream_ending_inside_a_message_fails_after_the_complete_ones() -> None:
    wire = Wire()
    events = wire.call(1, STREAM, body=message(b"one") + message(b"two")[:4])
    call = first_call(events)
    assert call.take_batch() == [b"one"] and not call.cancelled
    assert call.error is not None and call.error.status is Status.INTERNAL
    assert wire.rejected == ["truncated"]


def test_held_messages_keep_the_window_closed_until_the_handler_takes_them() -> None:
    wire = Wire(ServerLimits(stream_window=1000))
    events = wire.call(1, STREAM, body=message(b"x" * 600), end=False)
    call = first_call(events)
    wire.answer()
    assert wire.client.local_flow_control_window(1) == 1000 - 605
    assert call.take_batch() == [b"x" * 600]
    call.release()
    updates = [e for e in wire.answer() if isinstance(e, h2.events.WindowUpdated)]
    assert {e.stream_id for e in updates} >= {1}
    assert wire.client.local_flow_control_window(1) == 1000


def test_a_partial_message_is_let_in_at_once() -> None:
    """Bytes of a message still being assembled are acknowledged as they come, so a message
    larger than the stream window still gets through."""
    wire = Wire(ServerLimits(stream_window=1000, max_message_size=5000))
    events = wire.call(1, STREAM, body=message(b"y" * 3000)[:900], end=False)
    wire.answer()
    assert wire.client.local_flow_control_window(1) == 1000
    call = first_call(events)
    assert call.buffered == 900 and not call.messages


def test_a_compressed_call_inflates_when_taken_and_never_past_the_limit() -> None:
    wire = Wire(ServerLimits(max_message_size=1000))
    body = message(b"a" * 900, compressed=True) + message(b"b" * 2000, compressed=True)
    events = wire.call(1, STREAM, body=body, extra=[("grpc-encoding", "gzip")])
    call = first_call(events)
    assert type(call).__name__ == "CompressedCall"
    assert call.take_batch() == [b"a" * 900]  # the good prefix first, then the error
    assert call.error is not None and call.error.status is Status.RESOURCE_EXHAUSTED
    assert "inflates past the limit of 1000" in str(call.error.message)
    assert wire.rejected == ["oversize"] and not call.messages


def test_a_compressed_message_on_an_identity_call_fails_it() -> None:
    wire = Wire()
    events = wire.call(1, STREAM, body=message(gzip.compress(b"z"), compressed=True))
    call = first_call(events)
    assert call.error is not None and call.error.status is Status.INTERNAL and call.cancelled


def test_a_client_reset_cancels_the_call_and_opens_windows() -> None:
    wire = Wire()
    events = wire.call(1, STREAM, body=message(b"one"), end=False)
    call: Call = first_call(events)
    wire.client.reset_stream(1, ErrorCodes.CANCEL)
    events = wire.send()
    assert changed(events) == [1] and any(isinstance(e, WindowOpened) for e in events)
    assert call.reset and call.cancelled


def test_drain_goaway_ping_then_final_goaway() -> None:
    wire = Wire()
    wire.call(1, STREAM, end=False)
    wire.proto.start_drain()
    frames = split_frames(wire.proto.data_to_send())
    goaway, ping = frames[-2:]
    assert isinstance(goaway, GoAwayFrame) and goaway.last_stream_id == MAX_STREAM_ID
    assert isinstance(ping, PingFrame) and ping.opaque_data == DRAIN_PING
    # (h2's client closes its state machine at a GOAWAY: this is what a client sends back)
    ack = PingFrame(0, opaque_data=DRAIN_PING, flags=["ACK"]).serialize()
    assert any(isinstance(e, PingAcked) for e in wire.proto.receive_data(ack))
    # a stream the client opened before it saw the GOAWAY is still served
    wire.client.send_headers(3, request_headers(STREAM))
    assert started(wire.send()) == [3]
    wire.proto.refuse_connection(ErrorCodes.NO_ERROR)
    assert wire.proto.last_stream_id == 3
    (final,) = split_frames(wire.proto.data_to_send())
    assert isinstance(final, GoAwayFrame) and final.last_stream_id == 3


def test_the_clients_goaway_is_reported_and_its_calls_still_answered() -> None:
    wire = Wire()
    wire.call(1, STREAM, end=False)
    wire.client.close_connection()
    assert any(isinstance(e, PeerGoingAway) for e in wire.send())
    assert wire.proto.last_stream_id == 1
    # a GOAWAY from the client closes nothing of ours: the call in progress is answered
    call = wire.proto.calls[1]
    wire.proto.send_headers(call)
    wire.proto.finish(call, Status.OK)
    wire.proto.start_drain()
    wire.proto.end_call(call)
    assert wire.proto.calls == {}
    frames = split_frames(wire.proto.data_to_send())
    assert [type(f).__name__ for f in frames] == [
        "HeadersFrame",
        "HeadersFrame",
        "RstStreamFrame",
        "GoAwayFrame",
        "PingFrame",
    ]
    assert "END_STREAM" in frames[1].flags


def test_calls_past_twice_the_stream_limit_are_refused() -> None:
    """A call answered whose handler is not done no longer counts as an HTTP/2 stream, but
    the protocol still holds it: at most twice the stream limit of those."""
    wire = Wire(ServerLimits(max_concurrent_streams=2))
    for pair in ((1, 3), (5, 7)):
        events = []
        for stream_id in pair:
            events += wire.call(stream_id, STREAM)
        for stream_id in started(events):
            wire.proto.finish(wire.proto.calls[stream_id], Status.OK)
        wire.answer()
    assert sorted(wire.proto.calls) == [1, 3, 5, 7]
    assert started(wire.call(9, STREAM)) == []
    resets = [e for e in wire.answer() if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(9, ErrorCodes.REFUSED_STREAM)]
    wire.proto.end_call(wire.proto.calls[1])
    assert started(wire.call(11, STREAM)) == [11]


def test_bytes_that_are_not_http2_are_refused_with_a_goaway() -> None:
    wire = Wire(handshake=False)
    wire.proto.data_to_send()
    with pytest.raises(ConnectionBroken) as caught:
        wire.proto.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert caught.value.reason == "malformed" and wire.rejected == ["malformed"]
    assert b"\x07" in wire.proto.data_to_send()[:9]  # a GOAWAY frame (type 7)


def test_an_overlong_frame_is_refused_from_its_header() -> None:
    """A frame longer than our SETTINGS_MAX_FRAME_SIZE is refused before its body is read."""
    limits = ServerLimits(max_frame_size=16384, max_header_list_size=1024)
    wire = Wire(limits)
    wire.send()
    with pytest.raises(ConnectionBroken) as caught:
        wire.proto.receive_data(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")  # DATA, 16 MiB
    assert caught.value.reason == "oversize" and wire.rejected == ["oversize"]
    frames = wire.proto.data_to_send()
    assert frames[3] == 7 and frames[-4:] == ErrorCodes.FRAME_SIZE_ERROR.to_bytes(4, "big")


def test_events_are_the_protocols_own() -> None:
    wire = Wire()
    events = wire.call(1, SEND, body=message(b""))
    assert [type(e) for e in events][:1] == [CallStarted]


def test_partial_messages_past_the_connection_budget_are_refused() -> None:
    """Bytes of partial messages are let in at once (flow control does not bound them), so
    the connection's budget does: the call that would take it past is refused."""
    limits = ServerLimits(max_message_size=10_000, stream_window=4000, connection_budget=5000)
    wire = Wire(limits)
    first = first_call(wire.call(1, STREAM, body=message(b"a" * 9000)[:3000], end=False))
    assert wire.proto.held == 3000 and not first.cancelled
    second = first_call(wire.call(3, STREAM, body=message(b"b" * 9000)[:3000], end=False))
    assert second.cancelled and second.error is not None
    assert second.error.status is Status.RESOURCE_EXHAUSTED
    assert wire.rejected == ["over_budget"] and wire.proto.held == 3000
    assert list(wire.proto.partial) == [first]


def test_a_compressed_batch_in_hand_is_charged_until_the_next_read() -> None:
    limits = ServerLimits(max_message_size=3000, connection_budget=5000)
    wire = Wire(limits)
    body = message(b"a" * 2000, compressed=True) * 3
    events = wire.call(1, STREAM, body=body, extra=[("grpc-encoding", "gzip")])
    call = first_call(events)
    # 4000 inflated in hand: the third would take the connection past 5000, so the call
    # fails after the good prefix (the handler's next read raises the error)
    assert call.take_batch() == [b"a" * 2000, b"a" * 2000]
    assert wire.proto.held >= 4000
    assert call.error is not None and call.error.status is Status.RESOURCE_EXHAUSTED
    assert wire.rejected == ["over_budget"]
    call.release()
    assert wire.proto.held == 0


def test_overdue_partial_messages_are_cut_oldest_first() -> None:
    now = [100.0]
    wire = Wire()
    wire.proto.clock = lambda: now[0]
    old = first_call(wire.call(1, STREAM, body=message(b"x" * 50)[:20], end=False))
    now[0] = 105.0
    young = first_call(wire.call(3, STREAM, body=message(b"y" * 50)[:20], end=False))
    done = first_call(wire.call(5, STREAM, body=message(b"z" * 5), end=False))
    assert wire.proto.oldest_partial() == 100.0 and done not in wire.proto.partial
    assert wire.proto.overdue(started_before=104.0) == [old]
    assert old.cancelled and old.error is not None
    assert old.error.status is Status.DEADLINE_EXCEEDED
    assert wire.rejected == ["too_slow"] and wire.proto.oldest_partial() == 105.0
    wire.client.send_data(3, message(b"y" * 50)[20:])  # the message completes: not partial
    wire.send()
    assert wire.proto.partial == {} and young.messages
