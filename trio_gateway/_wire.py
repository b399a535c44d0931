"""What both sides of the wire agree on: names, paths and address syntax that the gateway's
listeners and the ``send`` client (:mod:`trio_gateway.loadgen`) must spell the same way.

It imports nothing but the error type, so the client can use it without loading a server.
"""

from __future__ import annotations

from ._errors import ConfigurationError

__all__ = (
    "ACK_SUBPROTOCOL",
    "DEFAULT_ADMIN",
    "DEFAULT_HTTP_PATH",
    "GRPC_CONTENT_TYPE",
    "GRPC_METHODS",
    "GRPC_SERVICE",
    "IDEMPOTENCY_KEY",
    "MAX_KEY_LENGTH",
    "idempotency_key",
    "parse_hostport",
)

ACK_SUBPROTOCOL = "trio-gateway.ack.v1"
"""The WebSocket subprotocol a client offers (``Sec-WebSocket-Protocol``) to receive acks."""

DEFAULT_ADMIN = "127.0.0.1:9100"
"""Where ``serve`` puts its admin endpoint (``/metrics``, ``/healthz``, ``/readyz``) by default,
and where ``top`` looks for it."""

DEFAULT_HTTP_PATH = "/ingest"
"""Where the HTTP listener takes ``POST`` requests unless configured otherwise."""

GRPC_SERVICE = "/trio_gateway.v1.Gateway/"
"""The gateway's gRPC service (``protos/gateway.proto``): a method's path is this + its name."""

GRPC_METHODS = {"unary": "Send", "stream": "Stream", "bidi": "StreamAcked"}
"""The service's methods by call shape: one message per call, a client stream with one final
``Ack``, a bidirectional stream with an ``Ack`` per message."""

GRPC_CONTENT_TYPE = "application/grpc+proto"

IDEMPOTENCY_KEY = "idempotency-key"
"""The HTTP header (``Idempotency-Key``) and the gRPC metadata key that carry a sender's
message id (docs/reliability.md, "Idempotency ids")."""

MAX_KEY_LENGTH = 200
"""The longest key taken: the ids made of it become ``Nats-Msg-Id`` headers downstream."""

_KEY_CHARACTERS = bytes(range(0x21, 0x7F))
"""What a key may hold: visible ASCII (no space, no control character)."""


def idempotency_key(value: str | bytes) -> str | None:
    """The key of an ``Idempotency-Key`` value (bare, or a structured-field string in quotes
    as the IETF draft writes it), or None if it is not 1 to :data:`MAX_KEY_LENGTH` visible
    ASCII characters."""
    raw = value.encode("utf-8", "replace") if isinstance(value, str) else value
    raw = raw.strip()
    if len(raw) >= 2 and raw[:1] == raw[-1:] == b'"':
        raw = raw[1:-1]
    if not 0 < len(raw) <= MAX_KEY_LENGTH or raw.translate(None, _KEY_CHARACTERS):
        return None
    return raw.decode("ascii")


def parse_hostport(value: str, *, key: str) -> tuple[str, int]:
    """``"127.0.0.1:7000"``, ``"[::1]:7000"``, ``":7000"`` (-> 127.0.0.1) -> (host, port)."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigurationError(key, f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    port = int(port_text)
    if port > 65535:
        raise ConfigurationError(key, f"port must be 0-65535, got {port}")
    return host, port
