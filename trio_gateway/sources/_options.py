"""The listen options every stream source shares, validated once.

TCP, HTTP, WebSocket and gRPC each take the same address, connection limits, TLS files, bearer
token and ``SO_REUSEPORT`` switch. :class:`ListenOptions` checks them in one place, with errors
that name ``<transport>.<key>`` (``http.token``, ``grpc.certfile``), so every source refuses a
bad value the same way.

The sources keep their own keyword arguments, spelled out with their types and defaults: they
are the public API, and ``help(TcpSource)`` or an IDE should show every option and its default
in one signature. The defaults differ per source (TCP's ``idle_timeout`` is 300 s, the others'
60 s; gRPC's ``max_message_size`` is 4 MiB), which a ``**options: Unpack[TypedDict]`` could not
say (a TypedDict has no defaults, so the signature would hide them behind one opaque name).
Rather than pass the same dozen keywords on by hand in each constructor, a source hands its
arguments over at once, ``ListenOptions.from_arguments(self.transport, locals())``, and the
fields take what they name. mypy checks each argument against the source's own signature;
:meth:`ListenOptions.__post_init__` then checks the values.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .._errors import ConfigurationError
from .._tls import resolve_server_tls

__all__ = ("DEFAULT_MAX_MESSAGE_SIZE", "ListenOptions", "check_origins", "check_reuse_port")

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20

PathLike = str | os.PathLike[str]


def check_reuse_port(key: str, reuse_port: bool) -> None:
    """Refuse ``reuse_port=True`` where the platform has no ``SO_REUSEPORT`` (Windows)."""
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError(key, "SO_REUSEPORT is not available on this platform")


def check_origins(key: str, origins: Sequence[str]) -> tuple[str, ...]:
    """The allow-list as given, or a :class:`ConfigurationError` naming ``key``: each entry is
    an origin as a browser sends it (``scheme://host[:port]``, no path), or ``*`` (any)."""
    if isinstance(origins, str | bytes):
        raise ConfigurationError(key, f"expected a list of origins, got {origins!r}")
    for origin in origins:
        if origin == "*":
            continue
        scheme, sep, rest = origin.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
            raise ConfigurationError(
                key, f"expected an origin like https://app.example.com (no path), got {origin!r}"
            )
        if origin != origin.lower():
            raise ConfigurationError(key, f"an origin is lowercase, got {origin!r}")
    return tuple(origins)


@dataclass(frozen=True, kw_only=True)
class ListenOptions:
    """One listener's address, limits, TLS and token, checked at construction.

    TLS comes from ``ssl_context`` or ``certfile``/``keyfile`` (``client_ca``: mutual TLS),
    never both; ``alpn`` is what a context built from files offers. The context in use is
    :attr:`tls` (``None``: cleartext).
    """

    transport: str
    host: str = "127.0.0.1"
    port: int = 0
    max_connections: int = 1024
    idle_timeout: float = 60.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    token: str | None = None
    handshake_timeout: float = 10.0
    reuse_port: bool = False
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    certfile: PathLike | None = None
    keyfile: PathLike | None = None
    client_ca: PathLike | None = None
    alpn: Sequence[str] | None = None
    tls: ssl.SSLContext | None = field(init=False, repr=False)

    @classmethod
    def from_arguments(
        cls, transport: str, arguments: Mapping[str, Any], **overrides: Any
    ) -> ListenOptions:
        """The options among a source constructor's ``arguments`` (its ``locals()``), the
        rest left at their defaults; ``overrides`` (``alpn``) win over both.

        A source without a ``token`` or ``handshake_timeout`` parameter simply has none to hand
        over: the field's default applies.
        """
        chosen = {name: arguments[name] for name in _ARGUMENT_FIELDS if name in arguments}
        return cls(transport=transport, **{**chosen, **overrides})

    def __post_init__(self) -> None:
        prefix = self.transport
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"{prefix}.port", f"must be 0-65535, got {self.port}")
        if self.max_connections < 1:
            raise ConfigurationError(f"{prefix}.max_connections", "must be at least 1")
        if self.idle_timeout <= 0:
            raise ConfigurationError(f"{prefix}.idle_timeout", "must be positive")
        if self.max_message_size < 1:
            raise ConfigurationError(f"{prefix}.max_message_size", "must be positive")
        if self.token is not None and not self.token:
            raise ConfigurationError(f"{prefix}.token", "must not be empty")
        if self.handshake_timeout <= 0:
            raise ConfigurationError(f"{prefix}.handshake_timeout", "must be positive")
        check_reuse_port(f"{prefix}.reuse_port", self.reuse_port)
        tls = resolve_server_tls(
            prefix, self.ssl_context, self.certfile, self.keyfile, self.client_ca, alpn=self.alpn
        )
        object.__setattr__(self, "tls", tls)  # derived once; the object stays frozen after


_ARGUMENT_FIELDS = tuple(f.name for f in fields(ListenOptions) if f.init and f.name != "transport")
"""The fields a source's constructor may hand over by name (not the derived ``tls``)."""
