"""Refusing a connection past ``max_connections`` so that its client can read the answer:
a complete answer, then :func:`linger` (read and discard what the peer still sends), and for
HTTP/2 an answered first request and a ``GOAWAY`` (:func:`refuse_http2`). Used by
``serve_connections`` (sources/_base.py) and the HTTP, WebSocket and gRPC listeners."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes

__all__ = ("LINGER_MAX_BYTES", "REFUSAL_DEBUG_DATA", "linger", "refuse_http2", "refuse_with")

LINGER_MAX_BYTES = 1 << 20
"""Bytes a refusal reads (and discards) at most: :func:`linger`, and the requests that
:func:`refuse_http2` waits for."""
REFUSAL_DEBUG_DATA = b"too many connections"
"""The debug data of the GOAWAY that ends a refused HTTP/2 connection."""
_GOAWAY_MARGIN = 0.1
"""Seconds before the caller's deadline at which :func:`refuse_http2` stops waiting for
requests and answers as things are."""


async def linger(stream: trio.abc.Stream, *, max_bytes: int = LINGER_MAX_BYTES) -> None:
    """After the last answer: half-close (plain TCP), then read and discard what the peer
    still sends until it closes or ``max_bytes`` have come. The caller bounds the time.

    Closing a socket with unread data makes the kernel send a reset, and a reset can destroy
    the answer before the client has read it (a client still sending its request, or a
    WebSocket close frame racing the client's messages). A peer that breaks the connection
    meanwhile ends the linger quietly: there is nothing left to save.
    """
    received = 0
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        while received < max_bytes:
            data = await stream.receive_some(min(64 * 1024, max_bytes - received))
            if not data:
                return
            received += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


def refuse_with(answer: bytes) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    """A ``refuse`` for :func:`serve_connections` that sends ``answer`` (e.g. a complete
    HTTP/1.1 ``503`` with ``Connection: close``) at once, then lingers: the client's request
    is read and discarded, so it can finish sending and read the answer."""

    async def refuse(stream: trio.abc.Stream) -> None:
        await stream.send_all(answer)
        await linger(stream)

    return refuse


async def refuse_http2(
    stream: trio.abc.Stream,
    received: bytes,
    answer: Callable[[h2.connection.H2Connection, int], None],
    *,
    whole_requests: bool,
) -> None:
    """Refuse an HTTP/2 connection with an answer to its first requests, then ``GOAWAY``.

    Sends the server preface, reads the client's (``received``: bytes already read from it)
    and calls ``answer(h2conn, stream_id)``, which must send a complete response (ending the
    stream), for the first requests: with ``whole_requests``, once a request has ended (its
    body is read and discarded, the flow-control windows kept open), as HTTP clients want
    them (curl gives up on a response that arrives while it is still sending); otherwise at
    its headers (gRPC: a streaming call may wait for the answer before it ends). A request
    whose body is still coming then is reset with ``NO_ERROR`` ("stop sending, the answer
    is final", RFC 9113 section 8.1). Then ``GOAWAY(NO_ERROR)`` naming the last answered
    stream, with :data:`REFUSAL_DEBUG_DATA`, and :func:`linger`.

    Why answer a request rather than send a bare ``GOAWAY``: a ``GOAWAY`` that refuses every
    stream (last stream 0) means "nothing was processed, try again", which grpcio does at once
    and without end (its calls end in ``DEADLINE_EXCEEDED``, or never) and grpclib reports as
    a lost connection. An answered request is a status the client reports as such.

    Bytes that are not HTTP/2 get h2's ``GOAWAY(PROTOCOL_ERROR)``. Past
    :data:`LINGER_MAX_BYTES`, or 0.1 s before the caller's deadline (``serve_connections``'
    ``refusal_timeout``), the requests begun are answered as they are; the end of the stream
    or no request at all ends it with a bare ``GOAWAY``.
    """
    h2conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    h2conn.initiate_connection()
    data = received
    seen = 0
    waiting: list[int] = []  # requests whose end we wait for (whole_requests)
    answered: list[int] = []
    ended: set[int] = set()
    tried = 0  # requests answered, or that could not be (the loop ends after the first)

    def respond(stream_id: int) -> None:
        nonlocal tried
        tried += 1
        try:
            answer(h2conn, stream_id)
        except h2.exceptions.H2Error:
            return  # the client closed it meanwhile (its RST_STREAM, GOAWAY or zero window)
        answered.append(stream_id)

    # Leave time for the answer and the GOAWAY before the caller's deadline.
    with trio.move_on_at(trio.current_effective_deadline() - _GOAWAY_MARGIN):
        while True:
            if data:
                seen += len(data)
                try:
                    events = h2conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    await stream.send_all(h2conn.data_to_send())  # h2's GOAWAY(PROTOCOL_ERROR)
                    await linger(stream)
                    return
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        if whole_requests:
                            waiting.append(event.stream_id)
                        else:
                            respond(event.stream_id)
                    elif isinstance(event, h2.events.DataReceived):
                        h2conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        ended.add(event.stream_id)
                        if event.stream_id in waiting:
                            waiting.remove(event.stream_id)
                            respond(event.stream_id)
                    elif isinstance(event, h2.events.StreamReset):
                        ended.add(event.stream_id)  # the client gave up on it: no answer
                        if event.stream_id in waiting:
                            waiting.remove(event.stream_id)
                            tried += 1
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        tried += 1  # the client's GOAWAY: the connection is over
                if tried or seen >= LINGER_MAX_BYTES:
                    break
            await stream.send_all(h2conn.data_to_send())
            data = bytes(await stream.receive_some(64 * 1024))
            if not data:
                break
    for stream_id in waiting:  # begun, not ended in time: answered as they are
        respond(stream_id)
    try:
        for stream_id in answered:
            if stream_id not in ended:
                h2conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        h2conn.close_connection(
            ErrorCodes.NO_ERROR,
            additional_data=REFUSAL_DEBUG_DATA,
            last_stream_id=max(answered, default=0),
        )
    except h2.exceptions.H2Error:
        pass  # the client's own GOAWAY closed the connection first: nothing more to say
    await stream.send_all(h2conn.data_to_send())
    await linger(stream)
