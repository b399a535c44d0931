"""Fuzz the sans-IO gRPC protocol: client byte streams (valid, mutated, random), cut anywhere.

Properties: it raises only its own :class:`ConnectionBroken`; while a connection lives, what it
holds stays within the configured bounds; and cutting the same bytes into other reads gives
the same events and the same state (when one cut hits a limit that only counts per read, the
stall limit, the events before it agree).
"""

from __future__ import annotations

import gzip
import itertools
from typing import Any

import h2.config
import h2.connection
import h2.exceptions
from grpc_protocol_kit import PUBLIC, SEND, STREAM, request_headers
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trio_gateway._proto import gateway_pb2
from trio_gateway.sources.grpc._calls import CallChanged
from trio_gateway.sources.grpc._events import CallStarted, ConnectionBroken
from trio_gateway.sources.grpc._limits import ServerLimits
from trio_gateway.sources.grpc._protocol import GrpcProtocol

LIMITS = ServerLimits(
    max_message_size=64,
    max_concurrent_streams=3,
    stream_window=300,
    connection_window=1 << 20,
    max_frame_size=16384,
    max_header_list_size=1024,
)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def _never(stream: Any) -> None:
    raise AssertionError


ROUTES = {
    path: Handler(_never, Cardinality.STREAM_UNARY, gateway_pb2.Message, gateway_pb2.Ack)
    for path in (SEND, STREAM, PUBLIC)
}

# -- client byte streams -------------------------------------------------------------------------

grpc_messages = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 0, 1, 2]), st.binary(max_size=80), st.sampled_from([0] * 6 + [-3, 2])
    ),
    min_size=1,
    max_size=4,
)


def _encode(parts: list[tuple[int, bytes, int]]) -> bytes:
    """gRPC messages, some compressed, some with an invalid flag or a length that lies."""
    out = b""
    for flag, body, lie in parts:
        if flag == 1:
            body = gzip.compress(body)
        out += bytes((flag,)) + max(0, len(body) + lie).to_bytes(4, "big") + body
    return out


calls = st.tuples(
    st.just("call"),
    st.sampled_from([SEND, STREAM, STREAM, PUBLIC, "/no/Such"]),
    st.sampled_from([(), (), (("grpc-encoding", "gzip"),), (("grpc-timeout", "1m"),)]),
    st.booleans(),
)
sends = st.tuples(st.just("data"), st.integers(0, 5), grpc_messages, st.booleans())
ops = st.lists(
    st.one_of(
        calls,
        calls,
        sends,
        sends,
        sends,
        st.tuples(st.just("end"), st.integers(0, 5)),
        st.tuples(st.just("reset"), st.integers(0, 5)),
        st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8)),
        st.tuples(st.just("window"), st.integers(0, 5), st.integers(1, 1000)),
        st.tuples(st.just("goaway")),
    ),
    max_size=16,
)
scripts = st.tuples(calls, sends, ops).map(
    lambda first: [(*first[0][:3], False), first[1], *first[2]]  # a call, then its data
)


def client_bytes(script: list[tuple[Any, ...]]) -> bytes:
    """What an h2 client writes for ``script`` (an operation h2 refuses is skipped). It has
    seen the server's settings (stream limit, windows) and keeps to them, but none of the
    server's answers: so what it sends is valid however the server answers."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    client.initiate_connection()
    client.receive_data(GrpcProtocol(LIMITS, routes=ROUTES).data_to_send())
    opened: list[int] = []  # streams the client may still send on (h2 closes a stream on
    for op in script:  # an invalid operation, so none is tried)
        try:
            if op[0] == "call":
                stream_id = client.get_next_available_stream_id()
                extra = [(k, v) for k, v in op[2]]
                headers = request_headers(op[1], extra=extra)
                client.send_headers(stream_id, headers, end_stream=op[3])
                if not op[3]:
                    opened.append(stream_id)
            elif not opened and op[0] in ("data", "end", "reset"):
                continue
            elif op[0] == "data":
                stream_id = opened[op[1] % len(opened)]
                client.send_data(stream_id, _encode(op[2]), end_stream=op[3])
                if op[3]:
                    opened.remove(stream_id)
            elif op[0] in ("end", "reset"):
                stream_id = opened.pop(op[1] % len(opened))
                if op[0] == "end":
                    client.end_stream(stream_id)
                else:
                    client.reset_stream(stream_id)
            elif op[0] == "ping":
                client.ping(op[1])
            elif op[0] == "window":
                target = opened[op[1] % len(opened)] if opened and op[1] else None
                client.increment_flow_control_window(op[2], stream_id=target)
            elif op[0] == "goaway":
                client.close_connection()
                break
        except h2.exceptions.H2Error:  # past a window or the stream limit
            continue
    return client.data_to_send()


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Flip, insert or delete bytes (``(position, kind, value)``)."""
    buffer = bytearray(data)
    for position, kind, value in edits:
        if not buffer:
            break
        at = position % len(buffer)
        if kind == 0:
            buffer[at] = value
        elif kind == 1:
            buffer.insert(at, value)
        else:
            del buffer[at]
    return bytes(buffer)


raw_frames = st.lists(
    st.tuples(st.integers(0, 11), st.integers(0, 255), st.integers(0, 7), st.binary(max_size=40)),
    max_size=10,
).map(
    lambda frames: b"".join(
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big") + payload
        for kind, flags, sid, payload in frames
    )
)

streams = st.one_of(
    scripts.map(client_bytes),
    st.tuples(
        scripts.map(client_bytes),
        st.lists(st.tuples(st.integers(0), st.integers(0, 2), st.integers(0, 255)), max_size=4),
    ).map(lambda pair: mutate(*pair)),
    raw_frames.map(lambda frames: PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + frames),
    st.binary(max_size=200).map(lambda noise: PREFACE + noise),
    st.binary(max_size=60),
)

# -- running one stream ------------------------------------------------------------------------


def run(data: bytes, cuts: list[int]) -> tuple[list[tuple[Any, ...]], str | None, Any]:
    """Feed ``data`` cut at ``cuts``; the events (normalized), the error reason and the state."""
    rejected: list[str] = []
    proto = GrpcProtocol(
        LIMITS, routes=ROUTES, authorized=lambda path, auth: True, reject=rejected.append
    )
    proto.data_to_send()
    events: list[tuple[Any, ...]] = []
    reason = None
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    for start, end in itertools.pairwise(bounds):
        try:
            got = proto.receive_data(data[start:end])
        except ConnectionBroken as exc:
            reason = exc.reason
            break
        for happened in got:
            if isinstance(happened, CallStarted):
                call = happened.call
                item: tuple[Any, ...] = ("started", call.stream_id, call.path)
            elif isinstance(happened, CallChanged):
                item = ("changed", happened.call.stream_id)
            else:
                item = (type(happened).__name__,)
            if not events or events[-1] != item:  # one per read or per frame: the same news
                events.append(item)
        check_bounds(proto)
        proto.data_to_send()
    state = {
        stream_id: (
            list(call.messages),
            call.ended,
            call.reset,
            call.cancelled,
            call.error and call.error.status,
        )
        for stream_id, call in proto.calls.items()
    }
    if reason is None:
        consume(proto)
    return events, reason, (state, rejected if reason is None else None)


def check_bounds(proto: GrpcProtocol) -> None:
    assert proto.stalled_bytes <= LIMITS.stall_limit
    assert len(proto.calls) <= 2 * LIMITS.max_concurrent_streams
    for call in proto.calls.values():
        assert call.buffered <= LIMITS.stream_window + LIMITS.max_message_size + 5
    # what the connection is charged is what its calls hold, within the budget
    assert proto.held == sum(call.buffered for call in proto.calls.values())
    assert proto.held <= LIMITS.connection_budget
    assert all(call.buffered for call in proto.partial)


def consume(proto: GrpcProtocol) -> None:
    """A handler's part: take every call's messages, release, finish; never an h2 error."""
    for call in list(proto.calls.values()):
        if call.messages:
            try:
                call.take_batch()
            except GRPCError:
                assert call.error is not None
        call.release()
        proto.end_call(call)
        proto.finish(call, call.error.status if call.error else Status.OK)
    proto.data_to_send()
    assert proto.held == 0 and not proto.partial


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=streams, cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_any_bytes_cut_anywhere_raise_only_its_errors_within_bounds(
    data: bytes, cuts: list[int]
) -> None:
    """``run`` checks the bounds after every read and lets only ConnectionBroken through.
    (Whether a broken client is cut can depend on where its reads end: the server's answers
    between two reads close streams and reopen windows.)"""
    run(data, [])
    run(data, cuts)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts, cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_a_valid_client_stream_cut_anywhere_gives_the_same_events(
    script: list[tuple[Any, ...]], cuts: list[int]
) -> None:
    data = client_bytes(script)
    whole = run(data, [])
    assert whole[1] is None, whole  # a well-behaved client is never cut
    assert run(data, cuts) == whole
    calls = whole[2][0].values()
    event(f"calls in progress: {min(len(calls), 3)}")
    event(f"messages held: {min(sum(len(state[0]) for state in calls), 3)}")
    event(f"calls failed: {sum(1 for state in calls if state[4])}")
