"""The HTTP source's direct HTTP/1.1 path: :class:`IngestRules` over :class:`H11Server`.

Hypercorn's Trio worker spends most of its time per request in its task and event machinery
(measured in ``bench/http.py`` and ``docs/http.md``), so HTTP/1.1 (cleartext or TLS) takes
this path by default: llhttp (:mod:`trio_gateway._http1`) on the Trio stream, one
``send_all`` per response.
"""

from __future__ import annotations

import trio

from ..._h11server import BadRequest, BodyTooLarge, H11Server, RequestTooSlow
from .._base import connection_errors
from ._reactor import Reactor
from ._rules import Headers, IngestRules, Reply, json_reply

__all__ = ("serve_http1",)


async def serve_http1(
    rules: IngestRules,
    stream: trio.abc.Stream,
    received: bytes,
    peer: str,
    *,
    idle_timeout: float,
    max_header_size: int,
    reactor: Reactor | None = None,
) -> None:
    """Serve ``POST`` requests with keep-alive until the peer closes or goes quiet.

    ``received``: the bytes already read to route the connection. A request (head and body)
    must be complete within ``idle_timeout`` of the end of the previous response: bytes
    trickling in do not extend it (slowloris; ``408`` and ``too_slow``). With a ``reactor``
    (Linux), the connection parks there between requests, which serves the simple ones
    inline and hands the rest back here (``_reactor.py``).
    """
    http = H11Server(stream, max_header_size=max_header_size, received=received)
    ingress = rules.ingress
    share = ingress.budget.connection()  # the body being read, charged to the memory budget
    cors: Headers = ()  # the current request's CORS headers (none unless configured)
    now = trio.lowlevel.current_clock().current_time  # (one call, not trio.current_time's 3)
    if rules.cors is not None:
        reactor = None  # (the reactor answers without CORS headers)
    try:
        with http.read_deadlines():  # (one cancel scope for the reads of every request)
            while True:
                deadline = now() + idle_timeout
                request = None
                judged = None
                body = None
                if reactor is not None and http.idle:
                    http.disarm()  # (parked, the connection is not reading)
                    back = await reactor.park(http, share, peer, deadline)
                    deadline = back.deadline
                    if back.error is not None:
                        raise back.error
                    if back.closed:
                        return
                    if back.unsent:
                        await http.send_rest(back.unsent)
                        if not http.next_cycle():
                            return
                        continue
                    request, judged, body = back.request, back.judged, back.body
                if request is None:
                    request = await http.receive_request(deadline)
                    if request is None:
                        return  # closed
                if rules.cors is not None:
                    cors = rules.cors_headers(request.headers)
                if judged is None:
                    judged = rules.head(
                        request.method, request.target, request.headers, request.fields
                    )
                reply, kind = judged
                if body is not None:  # read and held by the reactor; the queue did not take it
                    http.disarm()
                    reply = await rules.ingest(body, kind, peer)
                    share.close()
                if reply is None and not share.hold_nowait(_body_bytes(http, rules.max_body_size)):
                    ingress.reject("over_budget")
                    reply = rules.over_budget  # 503 + Retry-After before the body is read
                if reply is None:
                    try:
                        body = await http.receive_body(rules.max_body_size, deadline)
                    except BodyTooLarge:
                        reply = rules.body_too_large()
                    else:
                        reply = rules.ingest_nowait(body, kind, peer)
                        if reply is None:
                            http.disarm()  # (waiting for the queue is not reading)
                            reply = await rules.ingest(body, kind, peer)
                    share.close()  # queued now (or refused): the queue's share holds it
                headers = reply.headers + cors if cors else reply.headers
                await http.respond(reply.status, headers, reply.body, close=reply.close)
                if not http.next_cycle():
                    return
        # Only a read still waiting at its deadline ends the block without a return.
        if http.parser.started:
            raise RequestTooSlow("request not complete by its deadline")
        # (else quiet between requests: closed)
    except RequestTooSlow:
        ingress.reject("too_slow")
        connection_errors.info(
            "%s: %s: request not complete within %.0f s", ingress.listener, peer, idle_timeout
        )
        if http.can_respond:
            await _answer(http, rules.too_slow, cors)
    except BadRequest as exc:
        ingress.reject("malformed")
        connection_errors.info("%s: bad HTTP/1.1 from %s: %s", ingress.listener, peer, exc)
        if http.can_respond:
            await _answer(http, json_reply(exc.status, {"error": str(exc)}, close=True), cors)
    finally:
        share.close()


def _body_bytes(http: H11Server, limit: int) -> int:
    """What reading the request's body holds at most: its chunks and the joined body."""
    parser = http.parser
    if parser.content_length is not None:
        return 2 * min(parser.content_length, limit)
    assert parser.request is not None
    return 2 * limit if parser.request.method == b"POST" else 0  # chunked: up to the limit


async def _answer(http: H11Server, reply: Reply, cors: Headers) -> None:
    headers = reply.headers + cors if cors else reply.headers
    await http.respond(reply.status, headers, reply.body, close=reply.close)
