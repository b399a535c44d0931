"""One entry point for every transport, taking the target as the command line spells it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .._errors import ConfigurationError
from .._wire import parse_hostport
from ._connect import client_ssl_context
from ._grpc import send_grpc
from ._http import send_http
from ._run import SendSummary
from ._stream import send_tcp, send_udp
from ._websocket import send_websocket

__all__ = ("SENDERS", "send")

SENDERS: dict[str, Callable[..., Awaitable[SendSummary]]] = {
    "tcp": send_tcp,
    "udp": send_udp,
    "http": send_http,
    "ws": send_websocket,
    "grpc": send_grpc,
}
"""Each transport's function. ``http`` and ``ws`` take a URL (TLS is its scheme); the others
take a host and a port (and TLS, where the protocol has it, from an SSL context)."""


async def send(
    transport: str,
    target: str,
    *,
    tls: bool = False,
    cafile: str | None = None,
    **options: Any,
) -> SendSummary:
    """Run ``send --<transport> <target>``: ``target`` is a URL for ``http`` and ``ws``, else
    ``HOST:PORT``. ``tls`` (or a private CA, ``cafile``) turns TLS on for ``tcp`` and ``grpc``;
    ``options`` are the keyword arguments of the transport's function in :data:`SENDERS`."""
    sender = SENDERS.get(transport)
    if sender is None:
        raise ConfigurationError("transport", f"must be one of {', '.join(SENDERS)}")
    if transport in ("http", "ws"):
        if tls:
            raise ConfigurationError("--tls", f"{transport}: say it in the URL's scheme")
        return await sender(target, cafile=cafile, **options)
    host, port = parse_hostport(target, key=f"--{transport}")
    if tls or cafile is not None:
        if transport == "udp":
            raise ConfigurationError("--tls", "UDP has no TLS")
        options["ssl_context"] = client_ssl_context(cafile)
    return await sender(host, port, **options)
