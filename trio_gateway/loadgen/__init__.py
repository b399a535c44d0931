"""The load generator behind ``python -m trio_gateway send``, one module per transport.

Each ``send_*`` function sends ``count`` messages of ``size`` bytes (see :func:`make_payload`)
and returns a :class:`SendSummary`; :func:`send` takes the transport and target as the
command line spells them:

* :func:`send_tcp` (newline or length-prefixed frames, large writes) and :func:`send_udp`
  (one datagram per message). Neither protocol answers, so the summary has no accepted count.
* :func:`send_http`: ``POST`` one message (or an NDJSON batch) per request, h11 on Trio
  streams, ``concurrency`` keep-alive connections (``_http``).
* :func:`send_websocket`: one binary WebSocket message per message, ``websockets``' Sans-I/O
  protocol over a Trio stream; the closing handshake or the ack subprotocol is the receipt
  (``_websocket``).
* :func:`send_grpc`: the gateway's ``trio_gateway.v1.Gateway`` service over a small HTTP/2
  client on ``h2`` (``_grpc``, ``_h2``).

All of it is Trio, with the libraries the gateway already depends on at run time; the
connections of one run are tasks in one nursery that take the run's messages in chunks from a
shared counter (``_run``), so ``concurrency`` splits the work and ``rate`` paces the whole run.

Every message ends in exactly one bucket: ``accepted + sum(rejected.values()) == messages``
for the transports that answer. A refusal that every further message would meet as well (a
WebSocket handshake answered ``401``, a gRPC stream ended with ``UNAUTHENTICATED``, a close
``1009``) stops the run, and the messages not sent yet are counted under the same reason.
Refusals of single requests (HTTP ``401``/``503``, unary ``RESOURCE_EXHAUSTED``, a negative
bidi ack) do not stop it. A connection that fails before the gateway has answered in its
protocol (refused, TLS mismatch, another protocol on the port, a ``404`` handshake) raises a
:class:`~trio_gateway.TransportError` naming the likely cause (``_connect``); once it has
answered, losing the connection means the gateway went away: the run stops, what was in flight
and what was not sent count as ``connection lost``, and :attr:`SendSummary.stopped` says why.
With ``retries`` (HTTP, WebSocket, gRPC) a connection instead reconnects with backoff and
resends what was not acknowledged, so a run survives the gateway's restart (``_resend``); TCP
and UDP have no acknowledgement to resend against.

The names load lazily (PEP 562): ``send --help`` reads the plain values of ``_options``
without importing h2, websockets or protobuf.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._options import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from ._options import FIRST_ANSWER_TIMEOUT as FIRST_ANSWER_TIMEOUT
from ._options import GRPC_MODES as GRPC_MODES
from ._options import MAX_CONCURRENCY as MAX_CONCURRENCY
from ._options import MAX_RETRY_WAIT as MAX_RETRY_WAIT
from ._options import TRANSPORTS as TRANSPORTS
from ._options import resolve_token as resolve_token

if TYPE_CHECKING:
    from ._connect import client_ssl_context as client_ssl_context
    from ._grpc import send_grpc as send_grpc
    from ._http import send_http as send_http
    from ._run import LOST as LOST
    from ._run import SendSummary as SendSummary
    from ._run import make_payload as make_payload
    from ._send import send as send
    from ._stream import send_tcp as send_tcp
    from ._stream import send_udp as send_udp
    from ._websocket import send_websocket as send_websocket

__all__ = (
    "DEFAULT_TIMEOUT",
    "FIRST_ANSWER_TIMEOUT",
    "GRPC_MODES",
    "LOST",
    "MAX_CONCURRENCY",
    "MAX_RETRY_WAIT",
    "TRANSPORTS",
    "SendSummary",
    "client_ssl_context",
    "make_payload",
    "resolve_token",
    "send",
    "send_grpc",
    "send_http",
    "send_tcp",
    "send_udp",
    "send_websocket",
)

_LAZY = {
    "LOST": "._run",
    "SendSummary": "._run",
    "client_ssl_context": "._connect",
    "make_payload": "._run",
    "send": "._send",
    "send_grpc": "._grpc",
    "send_http": "._http",
    "send_tcp": "._stream",
    "send_udp": "._stream",
    "send_websocket": "._websocket",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
